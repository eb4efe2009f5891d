"""``pmi-pipeline embed``: count new shards and publish a new embedding version."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from pmi_pipeline.cli.progress import StageProgress
from pmi_pipeline.embed import EmbedParams, EmbedResult, embed

EPILOG = """\
examples:
  pmi-pipeline embed data/delicious --store stores/delicious --dim 64
  pmi-pipeline embed 'shards/*.parquet' --store S --pmi ppmi --smoothing 0.75 --factorization eig --power 0
  pmi-pipeline embed shards/ --store S --scheduler tcp://10.0.0.5:8786     # an existing Dask cluster

Running it again over the same shards adds nothing; new shards are added to the stored counts.
"""


def add_embed_params(parser: argparse.ArgumentParser) -> None:
    """The PMI and factorization options, shared by ``embed`` and ``reembed``."""
    d = EmbedParams()
    pmi = parser.add_argument_group("PMI")
    pmi.add_argument(
        "--pmi",
        choices=["pmi", "ppmi"],
        default=d.pmi,
        help="pmi: the seed's, on observed pairs only; ppmi: clipped at 0 (default: %(default)s)",
    )
    pmi.add_argument("--shift", type=float, default=d.shift, metavar="S", help="subtract log S (default: 1)")
    pmi.add_argument(
        "--smoothing",
        type=float,
        default=d.smoothing,
        metavar="ALPHA",
        help="marginals from counts**ALPHA, e.g. 0.75 (default: 1, none)",
    )
    pmi.add_argument(
        "--min-count",
        type=int,
        default=d.min_count,
        metavar="N",
        help="drop labels seen fewer than N times (default: %(default)s)",
    )
    pmi.add_argument(
        "--min-pair-count",
        type=int,
        default=d.min_pair_count,
        metavar="N",
        help="treat pairs seen fewer than N times as unobserved (default: %(default)s)",
    )
    fac = parser.add_argument_group("factorization")
    fac.add_argument(
        "--factorization",
        choices=["eig", "svd"],
        default=d.factorization,
        help="eig: top-k algebraic eigenvalues; svd: the seed's U sqrt(S) (default: %(default)s)",
    )
    fac.add_argument("--dim", type=int, default=d.dim, metavar="K", help="dimensions k (default: %(default)s)")
    fac.add_argument(
        "--power",
        type=float,
        default=d.power,
        metavar="P",
        help="E = V |lambda|^P; 0 weighs all dimensions equally, the seed paper used 0.5 (default: %(default)s)",
    )
    fac.add_argument(
        "--oversamples",
        type=int,
        default=None,
        metavar="N",
        help="extra sketch columns (default: max(K, 16))",
    )
    fac.add_argument(
        "--power-iter",
        type=int,
        default=d.n_power_iter,
        metavar="N",
        help="subspace iterations (default: %(default)s)",
    )
    fac.add_argument(
        "--spectral-shift",
        default=str(d.spectral_shift),
        metavar="S|auto",
        help="factorize A + S*I so that small positive eigenvalues are not missed; 'auto' estimates S from a "
        "first pass, 0 turns it off (default: %(default)s)",
    )
    fac.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    fac.add_argument("--no-warm-start", action="store_true", help="do not start from the previous version")
    fac.add_argument("--no-align", action="store_true", help="do not rotate onto the previous version")


def params_from_args(args: argparse.Namespace) -> EmbedParams:
    shift = args.spectral_shift if args.spectral_shift == "auto" else float(args.spectral_shift)
    try:
        return EmbedParams(
            pmi=args.pmi,
            shift=args.shift,
            smoothing=args.smoothing,
            min_count=args.min_count,
            min_pair_count=args.min_pair_count,
            factorization=args.factorization,
            dim=args.dim,
            power=args.power,
            n_oversamples=args.oversamples,
            n_power_iter=args.power_iter,
            spectral_shift=shift,
            seed=args.seed,
            warm_start=not args.no_warm_start,
            align=not args.no_align,
        )
    except ValueError as exc:
        from pmi_pipeline.cli import CLIError

        raise CLIError(str(exc)) from None


def add_dask_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Dask")
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="Dask scheduler address or scheduler file (default: start a local cluster)",
    )
    group.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="local cluster worker processes (default: one per core)",
    )
    group.add_argument(
        "--no-dask",
        action="store_true",
        help="count in this process, without a cluster (small data, debugging)",
    )


def client_from_args(args: argparse.Namespace):
    """Context manager yielding a Dask client, or None with --no-dask."""
    if args.no_dask:
        return contextlib.nullcontext(None)
    from pmi_pipeline.dask_cluster import dask_client

    return dask_client(args.scheduler, n_workers=args.workers)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="count label co-occurrences and publish an embedding version",
        description="Count label and pair co-occurrences in annotation shards (only those not yet counted in the "
        "store), compute the PMI matrix, factorize it and publish a new version of the Zarr store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "shards",
        nargs="+",
        metavar="SHARDS",
        help="Parquet files, directories, globs, or a directory written by `pmi-pipeline import`",
    )
    parser.add_argument("--store", required=True, help="embedding store directory (created if missing)")
    add_embed_params(parser)
    add_dask_args(parser)
    parser.add_argument("--no-wait", action="store_true", help="fail at once if another writer holds the store")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def print_result(result: EmbedResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    if result.version is None:
        print(result.message)
        return
    print(f"published {result.version} in {result.store}")
    print(
        f"  {result.n_examples:,} examples, {result.n_labels:,} labels embedded ({result.n_labels_total:,} "
        f"counted), {result.n_pairs:,} distinct pairs"
    )
    print(
        f"  new shards: {len(result.new_shards)}, already counted: {len(result.skipped_shards)}, "
        f"rejected: {len(result.rejected)}"
    )
    positive = (
        f"{result.n_positive_eigenvalues} of the top {result.dim_requested} eigenvalues are positive"
        if result.n_positive_eigenvalues < result.dim_requested
        else ""
    )
    print(f"  dimensions: {result.dim}" + (f" ({positive})" if positive else ""))
    top = ", ".join(f"{v:.2f}" for v in result.eigenvalues[:5])
    print(f"  leading eigenvalues: {top}")
    if result.alignment and "mean_cosine" in result.alignment:
        a = result.alignment
        print(
            f"  aligned to {a['parent']} on {a['n_shared']:,} shared labels: mean cosine "
            f"{a['mean_cosine']:.3f} (unaligned {a['mean_cosine_unaligned']:.3f}); {a['n_new_labels']} new labels"
        )
    print("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in result.timings.items()))


def run(args: argparse.Namespace) -> int:
    params = params_from_args(args)
    with StageProgress(enabled=not args.quiet) as progress, client_from_args(args) as client:
        result = embed(args.shards, args.store, params, client, progress=progress, wait=not args.no_wait)
    for error in result.rejected:
        print(f"rejected: {error}", file=sys.stderr)
    print_result(result, args.json)
    return 1 if result.rejected else 0
