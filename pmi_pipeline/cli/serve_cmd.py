"""``pmi-pipeline serve``: create the deployments and schedules on a Prefect server and serve them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pmi_pipeline.cli import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the deployments: periodic re-embed, shard-directory watcher, on-demand flows",
        description=(
            "Create the pipeline's deployments on the Prefect server named by PREFECT_API_URL and run their "
            "scheduled and on-demand runs from this process until interrupted: `re-embed/periodic` (cron), "
            "`watch-shards/poll` (re-embeds when a new shard appears in SHARD_DIR), `embed/on-demand`, "
            "`train/on-demand`, `evaluate/on-demand` and, with --data, `pipeline/on-demand`. With "
            "--train-pool, training is also deployed to that work pool (`train/gpu`), for a worker on a GPU "
            "machine: `prefect worker start --pool POOL`."
        ),
    )
    p.add_argument("--shards", required=True, metavar="SHARD_DIR", help="the shard directory to re-embed from")
    p.add_argument("--store", required=True, help="embedding store (Zarr directory)")
    p.add_argument("--cron", default="0 3 * * *", help="schedule of the periodic re-embed (default: %(default)s)")
    p.add_argument("--no-cron", action="store_true", help="no periodic re-embed")
    p.add_argument(
        "--watch-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="poll SHARD_DIR for new shards every SECONDS (default: %(default)s; 0: no watcher)",
    )
    p.add_argument("--params", help="EmbedParams JSON (file or inline) for new versions (default: parent's)")
    p.add_argument("--evaluate-run", help="training run re-evaluated after each re-embedding")
    p.add_argument("--data", help="import directory: also serve `pipeline/on-demand` on it")
    p.add_argument("--out", default="demo-output", help="output directory of the on-demand pipeline")
    p.add_argument("--train-pool", metavar="POOL", help="also deploy training to this work pool (`train/gpu`)")
    p.add_argument("--dask", metavar="ADDRESS", help="Dask scheduler for the counting flows (default: local)")
    p.add_argument("--limit", type=int, help="at most this many runs at once in this process")
    p.set_defaults(func=run)


def _check_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise CLIError(
            "serve needs a Prefect server: start one (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def run(args: argparse.Namespace) -> int:
    import flows
    from pmi_pipeline.cli.reembed_cmd import load_params

    if args.dask:
        os.environ[flows.DASK_ADDRESS_ENV] = args.dask  # read by the flows, in this process and its runs
    # Runs execute in subprocesses that import the flows by module name: make this checkout importable there.
    root = str(Path(flows.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    url = _check_server()

    from flows.deployments import TRAIN_POOL_DEPLOYMENT, build_deployments, deploy_training, serve

    store = str(Path(args.store).resolve())
    train_deployment = None
    if args.train_pool:
        deploy_training(args.train_pool, parameters={"store": store})
        train_deployment = f"train/{TRAIN_POOL_DEPLOYMENT}"
        print(
            f"deployed {train_deployment} to work pool {args.train_pool!r}: "
            f"start a worker there with `prefect worker start --pool {args.train_pool}`"
        )
    deployments = build_deployments(
        args.shards,
        store,
        cron=None if args.no_cron else args.cron,
        watch_every=args.watch_every or None,
        params=load_params(args.params),
        evaluate_run=args.evaluate_run,
        data=args.data,
        out=args.out,
        train_deployment=train_deployment,
    )
    print(f"serving {len(deployments)} deployments on {url} (Ctrl-C to stop)", flush=True)
    serve(deployments, limit=args.limit)
    return 0
