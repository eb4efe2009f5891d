"""The ``train`` and ``evaluate`` flows: a model on a store version, and its metrics, as Prefect runs.

``train`` runs :func:`pmi_pipeline.train.train` in one task (on whatever machine runs the flow: deploy it to a
GPU work pool to train there, see :mod:`flows.deployments`) and publishes:

- ``train-progress-<head>``: a progress artifact, updated after each epoch's evaluation;
- ``train-metrics-<head>``: the final metrics table (P@k, nDCG@k, PSP@k, MAP, cwMAP, percentages);
- ``train-curve-<head>``: the learning curve as a table (metrics on the test split vs step) and
  ``train-curve-plot-<head>``: the same as a picture (the run's ``learning_curve.png``).

``evaluate`` re-evaluates a run directory's checkpoint (:func:`pmi_pipeline.train.evaluate_run`) and publishes
``evaluate-metrics-<head>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run, task_run

from flows import artifact_key, png_data_uri, retry_unless_input_error

#: Metrics shown in the learning-curve table, in this order (others are in the run's history.json).
CURVE_COLUMNS = ("step", "epoch", "train_loss", "P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "wall_time_s")
#: A picture larger than this is linked, not inlined, in the artifact.
MAX_INLINE_PNG_BYTES = 2_000_000


class _EpochProgress(logging.Handler):
    """Turns the library's per-evaluation log records into updates of a progress artifact.

    :func:`pmi_pipeline.train.fit` evaluates at step 0 and after each epoch, logging ``step N: ...`` each
    time; the library has no callback, and must not depend on Prefect, so the flow listens to its logger.
    """

    def __init__(self, artifact_id: Any, epochs: int):
        super().__init__(logging.INFO)
        self.artifact_id, self.epochs, self.seen = artifact_id, max(1, epochs), 0

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("step "):
            return
        self.seen += 1
        try:
            update_progress_artifact(self.artifact_id, min(100.0, 100.0 * (self.seen - 1) / self.epochs))
        except Exception:  # progress is best effort; training goes on
            self.handleError(record)


@task(
    name="train-model",
    task_run_name=lambda: f"train {task_run.parameters['config']['head']}",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_input_error,
)
def train_task(config: dict[str, Any], run_dir: str) -> str:
    """Train with ``config`` (a :class:`pmi_pipeline.train.TrainConfig` as a dict) into ``run_dir``.

    Retried once: reading the store and the data can fail transiently; a retry starts the run over.
    """
    from pmi_pipeline.train import TrainConfig, train

    cfg = TrainConfig.from_dict(config)
    progress = create_progress_artifact(
        0.0, key=artifact_key("train-progress", cfg.head), description=f"Training the {cfg.head} head"
    )
    library_logger = logging.getLogger("pmi_pipeline.train")
    handler = _EpochProgress(progress, cfg.epochs)
    library_logger.addHandler(handler)
    previous_level = library_logger.level
    if library_logger.getEffectiveLevel() > logging.INFO:
        library_logger.setLevel(logging.INFO)
    try:
        result = train(cfg, run_dir, progress=False)
    finally:
        library_logger.removeHandler(handler)
        library_logger.setLevel(previous_level)
    update_progress_artifact(progress, 100.0)
    get_run_logger().info("%s head: %s", cfg.head, _fmt(result.metrics))
    return str(result.run_dir or run_dir)


@task(
    name="evaluate-model",
    task_run_name=lambda: f"evaluate {Path(task_run.parameters['run_dir']).name}",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_input_error,
)
def evaluate_task(run_dir: str, device: str = "auto") -> dict[str, float]:
    from pmi_pipeline.train import evaluate_run

    return evaluate_run(run_dir, device=device)


def evaluate_with_version(run_dir: str, store: str, version: str, device: str = "auto") -> dict[str, float]:
    """Test metrics of a cosine-head run decoded with another version of its store (e.g. a re-embedding).

    The model's k-dim outputs are decoded against ``version``'s embedding, which the re-embedding aligned to
    the version the model was trained on, and scored over ``version``'s vocabulary (new labels included, so
    they can be predicted). A BCE run does not depend on the embedding: its usual evaluation is returned.
    """
    from pmi_pipeline.train import evaluate_run

    return evaluate_run(run_dir, device=device, store=store, store_version=version)


def _fmt(metrics: dict[str, float], keys: tuple[str, ...] = ("P@1", "P@3", "P@5", "PSP@5")) -> str:
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys if k in metrics)


def _metrics_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    return [{"metric": name, "value (%)": round(float(value), 3)} for name, value in metrics.items()]


def report_run(run_dir: str | Path) -> dict[str, Any]:
    """Artifacts of a finished run directory: metrics table, learning curve (table and picture)."""
    run = Path(run_dir)
    result = json.loads((run / "metrics.json").read_text())
    metrics, facts = result["metrics"], result["run"]
    head = facts.get("head", "model")
    create_table_artifact(
        _metrics_rows(metrics),
        key=artifact_key("train-metrics", head),
        description=f"{head} head on {facts.get('data')} with store version {facts.get('store_version')} "
        f"({facts.get('steps')} steps): test metrics, in percent. Run: {run}",
    )
    history = json.loads((run / "history.json").read_text())
    curve = [
        {c: (round(row[c], 4) if isinstance(row[c], float) else row[c]) for c in CURVE_COLUMNS if c in row}
        for row in history
    ]
    create_table_artifact(
        curve, key=artifact_key("train-curve", head), description=f"Learning curve of the {head} head"
    )
    png = run / "learning_curve.png"
    if png.exists():
        picture = (
            f"![learning curve of the {head} head]({png_data_uri(png)})"
            if png.stat().st_size <= MAX_INLINE_PNG_BYTES
            else f"(picture too large to inline: `{png}`)"
        )
        create_markdown_artifact(
            f"# Learning curve: {head} head\n\n{picture}\n\nRun directory: `{run}`\n",
            key=artifact_key("train-curve-plot", head),
            description=f"Learning curve of the {head} head",
        )
    return {"run_dir": str(run), "head": head, "metrics": metrics, "run": facts}


def _train_run_name() -> str:
    p = flow_run.parameters
    return f"train {p.get('head', 'cosine')} on {Path(p['data']).name} ({Path(p['store']).name})"


@flow(name="train", flow_run_name=_train_run_name, log_prints=True)
def train_flow(
    data: str,
    store: str,
    run_dir: str,
    head: str = "cosine",
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the ``head`` ("cosine" or "bce") on the import directory ``data`` with the latest version of
    ``store`` (or ``config["store_version"]``), writing ``run_dir``. ``config``: any other
    :class:`pmi_pipeline.train.TrainConfig` fields (epochs, lr, hidden, device, ...).

    Returns ``{"run_dir", "head", "metrics", "run"}``.
    """
    cfg = {**(config or {}), "head": head, "store": str(store), "data": str(data)}
    done_dir = train_task(cfg, str(run_dir))
    return report_run(done_dir)


def _evaluate_run_name() -> str:
    return f"evaluate {Path(flow_run.parameters['run_dir']).name}"


@flow(name="evaluate", flow_run_name=_evaluate_run_name, log_prints=True)
def evaluate_flow(run_dir: str, device: str = "auto") -> dict[str, float]:
    """Re-evaluate the checkpoint in ``run_dir`` on its test split with the store version it was trained on.

    Publishes the metrics table ``evaluate-metrics-<head>``.
    """
    metrics = evaluate_task(run_dir, device)
    head = json.loads((Path(run_dir) / "config.json").read_text()).get("head", "model")
    create_table_artifact(
        _metrics_rows(metrics),
        key=artifact_key("evaluate-metrics", head),
        description=f"Re-evaluation of {run_dir} (test split, percent)",
    )
    get_run_logger().info("%s: %s", run_dir, _fmt(metrics))
    return metrics
