"""``pmi-pipeline demo``: the whole pipeline on the sample data, as a Prefect flow, in a few minutes."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pmi_pipeline.cli import CLIError

DEFAULT_DATA = ("data/delicious", "data/bibtex")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the pipeline flow on the sample data: embed, train both heads, evaluate",
        description=(
            "Run the `pipeline` Prefect flow on an import directory: embed its training annotations into "
            "OUT/store, train the cosine head and the BCE baseline into OUT/runs/<head>, evaluate both, and "
            "publish artifacts (embedding summary, eigenvalues, metrics, learning curves). Uses Prefect's "
            "ephemeral API (no server needed) unless PREFECT_API_URL is set, in which case the runs show in "
            "that server's UI."
        ),
    )
    p.add_argument("--data", help=f"import directory (default: the first of {', '.join(DEFAULT_DATA)})")
    p.add_argument("--out", default="demo-output", help="output directory (default: %(default)s)")
    p.add_argument("--heads", default="cosine,bce", help="heads to train (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs per head (default: %(default)s)")
    p.add_argument("--dim", type=int, help="embedding dimension (default: the library's)")
    p.add_argument("--device", default="auto", help="training device: auto | cpu | cuda (default: auto)")
    p.add_argument("--dask", metavar="ADDRESS", help="Dask scheduler for the counting (default: an in-process cluster)")
    p.add_argument("--json", action="store_true", help="print the pipeline's summary as one JSON object")
    p.set_defaults(func=run)


def _data_dir(explicit: str | None) -> Path:
    if explicit:
        path = Path(explicit)
        if not (path / "dataset.json").is_file():
            raise CLIError(f"{path}: not an import directory (no dataset.json); see `pmi-pipeline import`")
        return path
    for candidate in DEFAULT_DATA:
        if (Path(candidate) / "dataset.json").is_file():
            return Path(candidate)
    raise CLIError(f"no sample data found ({', '.join(DEFAULT_DATA)}): run from the repository root or give --data")


def run(args: argparse.Namespace) -> int:
    import os

    import flows

    if args.dask:
        os.environ[flows.DASK_ADDRESS_ENV] = args.dask  # read when the flow modules are imported, below

    data = _data_dir(args.data).resolve()
    out = Path(args.out).resolve()
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not heads or any(h not in ("cosine", "bce") for h in heads):
        raise CLIError(f"--heads: expected cosine and/or bce, got {args.heads!r}")
    params = {"dim": args.dim} if args.dim else None
    train_config = {"epochs": args.epochs, "device": args.device}
    mode = "Prefect server " + _api_url() if flows.server_mode() else "Prefect's ephemeral API (no server)"
    print(f"pipeline on {data} -> {out}, via {mode}", file=sys.stderr, flush=True)

    from flows.pipeline import pipeline_flow

    t0 = time.perf_counter()
    state = pipeline_flow(
        data=str(data), out=str(out), heads=heads, params=params, train_config=train_config, return_state=True
    )
    if not state.is_completed():
        raise CLIError(f"pipeline flow ended {state.name}: {state.message or ''}".strip())
    summary = state.result()
    seconds = time.perf_counter() - t0
    if args.json:
        json.dump({**summary, "seconds": seconds}, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(format_summary(summary, seconds))
    return 0


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def format_summary(summary: dict, seconds: float) -> str:
    embedding = summary["embedding"]
    lines = [
        f"done in {seconds:.0f} s",
        f"store:   {summary['store']}  (version {embedding.get('version') or 'unchanged'}: "
        f"{embedding.get('n_labels')} labels, dim {embedding.get('dim')}, "
        f"{embedding.get('n_examples')} examples)",
    ]
    for head, run in summary["runs"].items():
        m = run["metrics"]
        scores = ", ".join(f"{k} {m[k]:.2f}" for k in ("P@1", "P@3", "P@5", "PSP@5") if k in m)
        lines.append(f"{head + ':':8} {run['run_dir']}  ({scores})")
        lines.append(f"         metrics: {Path(run['run_dir']) / 'metrics.json'}")
    if summary.get("learning_curves"):
        lines.append(f"curves:  {summary['learning_curves']}")
    return "\n".join(lines)
