"""``pmi-pipeline neighbors``: the nearest labels of a label by cosine, like Table 2 of the seed paper."""

from __future__ import annotations

import argparse
import difflib
import json

from pmi_pipeline.cli import CLIError
from pmi_pipeline.neighbors import nearest_labels
from pmi_pipeline.store import EmbeddingStore


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "neighbors",
        help="print the nearest labels of a label with their cosine proximity",
        description="Print the labels closest to LABEL on the embedding sphere, with their cosine proximity.",
        epilog="example:\n  pmi-pipeline neighbors --store stores/delicious python programming -n 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("labels", nargs="+", metavar="LABEL", help="one or more labels")
    parser.add_argument("--store", required=True, help="embedding store directory")
    parser.add_argument("--version", default=None, help="store version (default: latest)")
    parser.add_argument("-n", type=int, default=10, help="how many neighbours (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    version = EmbeddingStore(args.store).read(args.version)
    index = version.index()
    unknown = [label for label in args.labels if label not in index]
    if unknown:
        hints = {u: difflib.get_close_matches(u, version.labels, n=3) for u in unknown}
        detail = "; ".join(f"{u!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for u, h in hints.items())
        raise CLIError(f"not in {version.name} of {args.store}: {detail}")
    result = {label: nearest_labels(version, label, args.n) for label in args.labels}
    if args.json:
        print(
            json.dumps(
                {
                    "version": version.name,
                    "neighbors": {k: [{"label": n, "cosine": c} for n, c in v] for k, v in result.items()},
                },
                indent=2,
            )
        )
        return 0
    for label, neighbours in result.items():
        width = max([len(n) for n, _ in neighbours] + [len(label) + 12])
        print(f"{'closest to: ' + label:<{width}}  proximity")
        for name, cosine in neighbours:
            print(f"{name:<{width}}  {cosine:.2f}")
        print()
    return 0
