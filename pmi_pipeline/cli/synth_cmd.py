"""``pmi-pipeline synth``: write a synthetic annotation corpus (Zipf frequencies, latent label groups)."""

from __future__ import annotations

import argparse
import json

from pmi_pipeline.errors import PipelineError

DESCRIPTION = """\
Write a synthetic multi-label corpus as annotation shards (Parquet, list form: example_id int64,
labels list<string>, zstd), shard-size examples per file, plus corpus.json (configuration and
totals) and labels.tsv (each label's latent group, frequency rank, probability and count).

Label frequencies follow a power law (Zipf); labels fall into latent groups, and each example
draws most of its labels from one or two groups, the rest by global frequency, so labels of one
group co-occur far more often than chance. The same seed gives the same bytes, whatever the
number of worker processes.
"""

EPILOG = """\
examples:
  pmi-pipeline synth /tmp/corpus --annotations 1e7 --labels 20000
  pmi-pipeline synth /tmp/small --examples 1000 --labels 200 --mean-labels 3 --groups 10 --json
"""


def _count(text: str) -> int:
    """An integer count that may be written as 1e7 or 10_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a whole non-negative number: {text!r}")
    return int(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic annotation corpus (Zipf frequencies, latent label groups)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output directory (created; must not already hold a corpus)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument(
        "--annotations",
        type=_count,
        metavar="N",
        help="target number of (example, label) annotations, e.g. 1e7; examples = N / mean-labels",
    )
    size.add_argument("--examples", type=_count, metavar="N", help="number of examples instead of annotations")
    p.add_argument("--labels", type=_count, default=20_000, metavar="M", help="number of labels (default 20000)")
    p.add_argument(
        "--mean-labels",
        type=float,
        default=5.0,
        metavar="X",
        help="mean labels per example, >= 1 (default 5)",
    )
    p.add_argument(
        "--groups",
        type=_count,
        default=None,
        metavar="G",
        help="latent label groups (default: one per 20 labels; 0: no group structure)",
    )
    p.add_argument(
        "--zipf",
        type=float,
        default=1.0,
        metavar="S",
        help="Zipf exponent of label frequencies (default 1.0)",
    )
    p.add_argument(
        "--group-share",
        type=float,
        default=0.8,
        metavar="F",
        help="expected fraction of an example's labels drawn from its groups (default 0.8)",
    )
    p.add_argument(
        "--shard-size",
        type=_count,
        default=250_000,
        metavar="N",
        help="examples per shard file (default 250000)",
    )
    p.add_argument("--seed", type=_count, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=_count, default=1, metavar="W", help="processes writing shards (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already in OUT")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pmi_pipeline.cli import CLIError
    from pmi_pipeline.synth import SynthConfig, write_corpus

    try:
        config = SynthConfig(
            n_annotations=args.annotations,
            n_examples=args.examples,
            n_labels=args.labels,
            mean_labels=args.mean_labels,
            n_groups=args.groups,
            zipf_exponent=args.zipf,
            group_share=args.group_share,
            shard_size=args.shard_size,
            seed=args.seed,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    try:
        summary = write_corpus(
            args.out,
            config,
            progress=not args.no_progress,
            workers=max(1, args.workers),
            overwrite=args.overwrite,
        )
    except OSError as exc:
        raise PipelineError(f"cannot write {args.out}: {exc}") from exc
    info = summary.to_dict()
    if args.json:
        info["out_dir"] = str(summary.out_dir)
        print(json.dumps(info, indent=2))
    else:
        print(
            f"wrote {summary.n_examples:,} examples, {summary.n_annotations:,} annotations "
            f"({summary.mean_labels:.2f} labels/example) over {config.n_labels:,} labels "
            f"in {len(summary.paths)} shards to {summary.out_dir}"
        )
        print(
            f"{info['n_labels_used']:,} labels used; the top 1% of labels hold "
            f"{info['top_1pct_label_share']:.0%} of annotations; {summary.elapsed_s:.1f} s "
            f"({summary.annotations_per_s:,.0f} annotations/s)"
        )
    return 0
