"""Every deployment and schedule of the pipeline, in one place.

:func:`build_deployments` returns the deployments that ``pmi-pipeline serve`` serves from one long-running
process (Prefect's ``serve``: no work pool or worker needed; runs execute as its subprocesses):

================================  ===========================================================================
deployment                        schedule
================================  ===========================================================================
``re-embed/periodic``             cron (``--cron``, default daily at 03:00): re-embed the shard directory
``watch-shards/poll``             every N seconds (``--watch-every``): re-embed when a new shard appears
``embed/on-demand``               none: start from the UI or ``prefect deployment run embed/on-demand``
``pipeline/on-demand``            none (only with ``--data``): embed, train both heads, evaluate
``train/on-demand``               none: train a head on the latest version
``evaluate/on-demand``            none: re-evaluate a run directory
================================  ===========================================================================

Both re-embedding deployments allow one run at a time (a new run is cancelled, not queued, while one is
running), so two polls never publish the same shards twice.

:func:`deploy_training` registers ``train/gpu`` on a work pool of its own (created as a ``process`` pool if
missing), so that training runs wherever a worker polls that pool, e.g. ``prefect worker start --pool gpu`` on
a GPU machine that has this package installed, while counting keeps running on the CPU machine that serves the
rest. Deployments use module entrypoints (``flows.train.train_flow``), so a worker needs the installed package,
not a copy of this checkout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType

from flows.embed import embed_flow
from flows.pipeline import pipeline_flow
from flows.reembed import reembed_flow, watch_shards_flow
from flows.train import evaluate_flow, train_flow

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CRON = "0 3 * * *"
DEFAULT_WATCH_SECONDS = 60
TAGS = ["pmi-pipeline"]
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
TRAIN_POOL_DEPLOYMENT = "gpu"


def _absolute(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def build_deployments(
    shard_dir: str,
    store: str,
    *,
    cron: str | None = DEFAULT_CRON,
    watch_every: float | None = DEFAULT_WATCH_SECONDS,
    params: dict[str, Any] | None = None,
    evaluate_run: str | None = None,
    data: str | None = None,
    out: str | None = None,
    train_deployment: str | None = None,
) -> list[RunnerDeployment]:
    """The served deployments. ``cron`` / ``watch_every`` None leave that schedule out.

    ``data``/``out``: defaults for the on-demand pipeline (left out without ``data``). ``train_deployment``: the
    pipeline's training goes to that deployment (e.g. ``train/gpu``) instead of the served process.
    """
    shard_dir, store = _absolute(shard_dir), _absolute(store)
    reembed_parameters = {
        "shards": [shard_dir],
        "store": store,
        "params": params,
        "evaluate_run": evaluate_run,
    }
    common = {"tags": TAGS, "entrypoint_type": EntrypointType.MODULE_PATH}
    deployments = [
        reembed_flow.to_deployment(
            "periodic",
            cron=cron,
            parameters=reembed_parameters,
            concurrency_limit=ONE_AT_A_TIME,
            description=f"Re-embed {shard_dir} into {store} on a schedule (cron {cron!r}).",
            **common,
        ),
        watch_shards_flow.to_deployment(
            "poll",
            interval=watch_every,
            parameters={
                "shard_dir": shard_dir,
                "store": store,
                "params": params,
                "evaluate_run": evaluate_run,
            },
            concurrency_limit=ONE_AT_A_TIME,
            description=f"Every {watch_every} s: re-embed when {shard_dir} holds a shard the store lacks.",
            **common,
        ),
        embed_flow.to_deployment(
            "on-demand",
            parameters={"shards": [shard_dir], "store": store, "params": params},
            description="Count new shards and publish a store version.",
            **common,
        ),
        train_flow.to_deployment(
            "on-demand",
            parameters={"store": store},
            description="Train a head on the latest version.",
            **common,
        ),
        evaluate_flow.to_deployment("on-demand", description="Re-evaluate a training run.", **common),
    ]
    if data is not None:
        out = _absolute(out or "demo-output")
        deployments.append(
            pipeline_flow.to_deployment(
                "on-demand",
                parameters={"data": _absolute(data), "out": out, "train_deployment": train_deployment},
                description="Embed, train both heads, evaluate.",
                **common,
            )
        )
    return deployments


def serve(deployments: list[RunnerDeployment], *, limit: int | None = None) -> None:
    """Register the deployments and run their scheduled and on-demand runs until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=limit, print_starting_message=True)


def deploy_training(
    work_pool: str,
    *,
    name: str = TRAIN_POOL_DEPLOYMENT,
    parameters: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
) -> UUID:
    """Register ``train/<name>`` on ``work_pool`` (a ``process`` pool is created if it does not exist)."""
    from prefect import deploy
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=work_pool, type="process", base_job_template=template))
        except ObjectAlreadyExists:
            pass  # an existing pool keeps its type and template (docker, kubernetes, ...)
    deployment = train_flow.to_deployment(
        name,
        parameters=parameters or {},
        work_pool_name=work_pool,
        job_variables=job_variables or {},
        tags=[*TAGS, "train", work_pool],
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"Training on the workers of the {work_pool!r} work pool.",
    )
    (deployment_id,) = deploy(
        deployment,
        work_pool_name=work_pool,
        build=False,
        push=False,
        print_next_steps_message=False,
        ignore_warnings=True,
    )
    return deployment_id
