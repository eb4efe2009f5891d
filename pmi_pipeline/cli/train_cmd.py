"""``pmi-pipeline train``: train the cosine head or the BCE baseline on a store version, write a run."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pmi_pipeline.cli import CLIError


def _widths(text: str) -> list[int]:
    if text.strip() in ("", "0", "linear"):
        return []
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 512,256, got {text!r}") from exc
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError("widths must be positive")
    return widths


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a store version (cosine head) or the labels (bce head)",
        description=(
            "Train one head on the features of an import directory. Both heads share encoder, optimizer, "
            "schedule and seed; only the last layer and the loss differ. Writes RUN/{config.json, "
            "checkpoint.pt, history.json, metrics.json, learning_curve.png}. Options not on the command "
            "line come from --config, then from the defaults (see --print-config)."
        ),
    )
    p.add_argument("--store", help="embedding store (Zarr directory)")
    p.add_argument("--store-version", help="store version name (default: the latest)")
    p.add_argument("--data", help="import directory written by `pmi-pipeline import`")
    p.add_argument("--head", choices=("cosine", "bce"), help="cosine: k outputs, -cos loss; bce: m sigmoid outputs")
    p.add_argument("--out", help="run directory to write")
    p.add_argument("--config", help="TrainConfig JSON to start from (e.g. a run's config.json)")
    p.add_argument("--print-config", action="store_true", help="print the resolved TrainConfig as JSON and exit")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd", "rmsprop"))
    p.add_argument("--schedule", choices=("constant", "cosine"))
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--hidden", type=_widths, help="MLP widths, e.g. 512,512 (default: linear)")
    p.add_argument("--dropout", type=float)
    p.add_argument("--input-norm", choices=("none", "l2"))
    p.add_argument("--embedding-dims", type=int, help="use only the first K columns of the embedding")
    p.add_argument("--cosine-loss", choices=("cosine", "softmax"), help="cosine head loss (default: -cos)")
    p.add_argument("--temperature", type=float, help="temperature of --cosine-loss softmax")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: auto)")
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--amp", dest="amp", action="store_true", default=None, help="bfloat16 autocast on CUDA")
    amp.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: once per epoch)")
    p.add_argument("--eval-k", type=int, help="predictions kept per test example (MAP@K)")
    p.add_argument("--psp-a", type=float)
    p.add_argument("--psp-b", type=float)
    p.add_argument("--remove-invalid", action="store_true", default=None, help="drop test rows without labels")
    p.add_argument("--val-fraction", type=float, help="evaluate on this held-out part of train, not test")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from pmi_pipeline.train import TrainConfig

    base = TrainConfig()
    if args.config:
        try:
            base = TrainConfig.from_json(Path(args.config).read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise CLIError(f"--config {args.config}: {exc}") from exc
    overrides = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides[f.name] = value
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    missing = [name for name, value in (("--store", cfg.store), ("--data", cfg.data), ("--out", args.out)) if not value]
    if missing:
        raise CLIError(f"missing {', '.join(missing)}")
    from pmi_pipeline.train import train

    result = train(cfg, args.out, progress=None if not args.no_progress else False)
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}))
    else:
        version = result.config.store_version
        print(f"{cfg.head} head, store {cfg.store} version {version}: run written to {args.out}")
        for key, value in result.metrics.items():
            print(f"  {key:>10}  {value:6.2f}")
    return 0
