"""The ``pipeline`` flow: embed an import directory, then train and evaluate each head on it, in order.

Each step is a subflow (``embed``, ``train``, ``evaluate``), so the UI shows them nested under the pipeline
run with their own tasks, logs and artifacts. Training runs in this process by default; with
``train_deployment`` (e.g. ``"train/gpu"``, see :mod:`flows.deployments`) it is started as a run of that
deployment, i.e. on whatever worker polls its work pool (a GPU machine), while counting stays here; the store
and the output directory must then be on a file system both machines see.

Artifact ``pipeline-summary``: the store version and each head's final metrics side by side; and
``pipeline-curves``: both heads' learning curves in one picture (the seed paper's Figure 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows import png_data_uri
from flows.embed import embed_flow
from flows.train import evaluate_flow, report_run, train_flow

SUMMARY_METRICS = ("P@1", "P@3", "P@5", "nDCG@3", "nDCG@5", "PSP@1", "PSP@5", "MAP@100")


def _train_remotely(deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Start a run of the training deployment, wait for it, and read what it wrote."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=None)
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"training run {run.name} of {deployment} ended {run.state and run.state.name}")
    return report_run(parameters["run_dir"])


@task(name="plot-learning-curves", task_run_name="plot learning curves")
def plot_curves(run_dirs: dict[str, str], out_png: str) -> str | None:
    from pmi_pipeline.plots import load_history, plot_learning_curves

    histories = {head: load_history(run_dir) for head, run_dir in run_dirs.items()}
    return str(plot_learning_curves(histories, out_png, title="test metrics vs training step"))


def _pipeline_run_name() -> str:
    return f"pipeline {Path(flow_run.parameters['data']).name}"


@flow(name="pipeline", flow_run_name=_pipeline_run_name, log_prints=True)
def pipeline_flow(
    data: str,
    out: str,
    heads: list[str] | None = None,
    params: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    train_deployment: str | None = None,
) -> dict[str, Any]:
    """Embed ``data`` (an import directory) into ``out/store``, train each of ``heads`` (default cosine and
    bce) into ``out/runs/<head>``, evaluate each run. ``params``: embedding parameters; ``train_config``:
    :class:`pmi_pipeline.train.TrainConfig` fields shared by both heads.

    Returns ``{"store", "embedding": <embed summary>, "runs": {head: {"run_dir", "metrics"}}}``.
    """
    logger = get_run_logger()
    heads = list(heads or ["cosine", "bce"])
    out_dir = Path(out).resolve()
    store = str(out_dir / "store")
    embedding = embed_flow(shards=[str(data)], store=store, params=params)
    logger.info(
        "store %s: version %s, %s labels x %s dims from %s examples",
        store,
        embedding.get("version") or "unchanged",
        embedding.get("n_labels"),
        embedding.get("dim"),
        embedding.get("n_examples"),
    )
    runs: dict[str, dict[str, Any]] = {}
    for head in heads:
        run_dir = str(out_dir / "runs" / head)
        parameters = {
            "data": str(data),
            "store": store,
            "run_dir": run_dir,
            "head": head,
            "config": train_config,
        }
        if train_deployment:
            logger.info("training %s on deployment %s", head, train_deployment)
            _train_remotely(train_deployment, parameters)
        else:
            train_flow(**parameters)
        metrics = evaluate_flow(run_dir)
        runs[head] = {"run_dir": run_dir, "metrics": metrics}
        logger.info("%s head: P@1 %.2f, P@5 %.2f (%s)", head, metrics.get("P@1", 0), metrics.get("P@5", 0), run_dir)
    version = embedding.get("version") or "(unchanged)"
    rows = [
        {"head": head, **{m: round(r["metrics"][m], 2) for m in SUMMARY_METRICS if m in r["metrics"]}}
        for head, r in runs.items()
    ]
    create_table_artifact(
        rows,
        key="pipeline-summary",
        description=f"{Path(data).name}, store {store} {version}: test metrics (%)",
    )
    png = plot_curves({head: r["run_dir"] for head, r in runs.items()}, str(out_dir / "learning_curves.png"))
    if png:
        create_markdown_artifact(
            f"# Learning curves on {Path(data).name}\n\n![learning curves]({png_data_uri(png)})\n\n`{png}`\n",
            key="pipeline-curves",
            description="Test metrics vs training step for each head",
        )
    summary = {"store": store, "embedding": embedding, "runs": runs, "learning_curves": png}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
