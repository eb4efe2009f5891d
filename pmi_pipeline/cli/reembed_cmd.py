"""``pmi-pipeline reembed``: run the re-embed flow once, by hand (count new shards, publish a version)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pmi_pipeline.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reembed",
        help="add new shards to a store as a new, aligned version (Prefect flow `re-embed`)",
        description=(
            "Run the `re-embed` Prefect flow once: count only the shards whose content hash is not in "
            "the store's manifest, add their counts to the latest version's, factorize starting from the "
            "previous eigenvectors, align the new embedding to the previous version (orthogonal Procrustes "
            "on shared labels) and publish it atomically. Runs on Prefect's ephemeral API unless "
            "PREFECT_API_URL is set."
        ),
    )
    p.add_argument("shards", nargs="+", help="shard files, directories, globs or import directories")
    p.add_argument("--store", required=True, help="embedding store (Zarr directory)")
    p.add_argument("--params", help="EmbedParams JSON (file or inline) for the new version (default: parent's)")
    p.add_argument("--evaluate-run", help="training run directory whose model is re-evaluated with the result")
    p.add_argument("--counts-cache", help="where per-shard counts are kept (default: STORE.shard-counts)")
    p.add_argument("--dask", metavar="ADDRESS", help="Dask scheduler address (default: an in-process cluster)")
    p.add_argument("--json", action="store_true", help="print the version's summary as one JSON object")
    p.set_defaults(func=run)


def load_params(text: str | None) -> dict | None:
    """EmbedParams as a dict from a JSON file or inline JSON; None stays None."""
    if not text:
        return None
    path = Path(text)
    try:
        raw = path.read_text() if path.is_file() else text
        params = json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"--params: not a JSON file or JSON object: {exc}") from exc
    if not isinstance(params, dict):
        raise CLIError("--params must be a JSON object")
    return params


def run(args: argparse.Namespace) -> int:
    import flows  # noqa: F401  (Prefect defaults before Prefect is imported)
    from flows import dask_task_runner
    from flows.reembed import reembed_flow

    flow = reembed_flow.with_options(task_runner=dask_task_runner(args.dask)) if args.dask else reembed_flow
    state = flow(
        shards=list(args.shards),
        store=str(Path(args.store).resolve()),
        params=load_params(args.params),
        counts_cache=args.counts_cache,
        evaluate_run=args.evaluate_run,
        return_state=True,
    )
    if not state.is_completed():
        raise CLIError(f"re-embed flow ended {state.name}: {state.message or ''}".strip())
    summary = state.result()
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    version = summary.get("version")
    lines = []
    if version is None:
        lines.append(f"nothing new: {summary.get('n_shards', 0)} shard(s), none new; the store is unchanged")
    else:
        parent = summary.get("parent") or "-"
        lines.append(
            f"published {version} (parent {parent}): {summary.get('n_examples')} examples, "
            f"{summary.get('n_labels')} labels, dim {summary.get('dim')}, "
            f"{summary.get('n_new_shards')} new shard(s)"
        )
    alignment = summary.get("alignment") or {}
    for key, value in alignment.items():
        if not isinstance(value, list | dict):
            lines.append(f"  alignment {key}: {value}")
    for item in summary.get("zero_shot") or []:
        lines.append(f"  new label {item.get('label')!r}: nearest {item.get('nearest')}")
    for key, value in (summary.get("evaluation") or {}).items():
        lines.append(f"  re-evaluation {key}: {value}")
    for error in summary.get("rejected") or []:
        lines.append(f"  rejected: {error}")
    return "\n".join(lines)
