"""The ``pmi-pipeline`` command: one subcommand per stage.

Each subcommand lives in its own module here and exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning an exit code. Modules are imported lazily by name
so that ``pmi-pipeline --help`` stays fast and a broken optional stage cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pmi_pipeline import __version__
from pmi_pipeline.errors import PipelineError
from pmi_pipeline.sort_dispatch import use_fast_sort

# (subcommand module, one-line help), in the order a user meets them.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("import_cmd", "import"),
    ("synth_cmd", "synth"),
    ("embed_cmd", "embed"),
    ("neighbors_cmd", "neighbors"),
    ("check_cmd", "check"),
    ("train_cmd", "train"),
    ("evaluate_cmd", "evaluate"),
    ("reembed_cmd", "reembed"),
    ("serve_cmd", "serve"),
    ("demo_cmd", "demo"),
)


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _quiet_dask(record: logging.LogRecord) -> bool:
    return not (record.name.startswith(("distributed", "dask")) and record.levelno < logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmi-pipeline",
        description="Learn label embeddings from the label PMI matrix and train models on them.",
    )
    parser.add_argument("--version", action="version", version=f"pmi-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name, _ in COMMANDS:
        try:
            module = importlib.import_module(f"pmi_pipeline.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pmi_pipeline.cli.{module_name}":
                continue  # stage not installed in this build
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything imports numpy, which reads its CPU dispatch once: on AMD Zen 4 its AVX2 sort, 4-5x as fast
    # as its AVX-512 one there. The Dask workers this process starts inherit it.
    use_fast_sort()
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        # distributed sets its loggers to INFO when imported and they reach our handler; -vv shows them.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_dask)
    try:
        return int(args.func(args) or 0)
    except (CLIError, PipelineError) as exc:
        print(f"pmi-pipeline {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
