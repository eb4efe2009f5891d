"""``pmi-pipeline check``: verify an embedding store's integrity."""

from __future__ import annotations

import argparse
import json

from pmi_pipeline.check import check_store


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="verify a store's integrity (shapes, metadata, checksums, counts, manifest)",
        description="Verify an embedding store: root metadata and latest, every version's arrays against the "
        "checksums recorded when it was published, shapes and vocabulary, and the accumulated counts. "
        "Exit status 0: sound (warnings allowed); 1: problems found.",
    )
    parser.add_argument("--store", required=True, help="embedding store directory")
    parser.add_argument("--version", action="append", default=None, help="check only this version (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the problems as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    problems = check_store(args.store, args.version)
    errors = [p for p in problems if p.severity == "error"]
    if args.json:
        print(
            json.dumps({"store": args.store, "ok": not errors, "problems": [p.to_dict() for p in problems]}, indent=2)
        )
    else:
        for problem in problems:
            print(problem)
        print(f"{args.store}: " + ("OK" if not errors else f"{len(errors)} problem(s)"))
    return 1 if errors else 0
