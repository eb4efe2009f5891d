"""Re-embedding when annotations arrive: the ``re-embed`` flow and the ``watch-shards`` flow that starts it.

``re-embed`` counts only the shards whose content hash is not in the store's manifest (each counting task is
cached by that hash), adds their counts to the latest version's, and publishes a new version atomically; the
library starts the factorization from the previous eigenvectors and aligns the new embedding to the previous
version on their shared labels (orthogonal Procrustes, stored with the version). The run reports:

- ``reembed-alignment``: how well the new version agrees with its parent (mean cosine between a label's
  aligned new and old vectors, shared and new labels);
- ``reembed-zero-shot``: each new label and its nearest known labels in the new version (new labels get their
  place from their co-occurrences, so a model can predict them at once);
- ``reembed-evaluation`` (with ``evaluate_run``): the latest model re-evaluated with the new version.

``watch-shards`` is what a schedule runs every N seconds: it compares the shard directory with the manifest
and starts ``re-embed`` (as a subflow) only when a new shard is there. A self-hosted Prefect server has no file
watcher, so polling against the manifest is the portable way; it costs one directory listing and one hash per
file per poll. Writers should create shards under a temporary name and rename them into place: a half-written
file is rejected, then counted once complete (its content hash differs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from flows import dask_task_runner, retry_unless_input_error
from flows.embed import count_new_shards, find_shards, publish_and_report, select_new_shards

#: At most this many new labels are listed in the zero-shot artifact (the most frequent first).
ZERO_SHOT_ROWS = 200


@task(
    name="zero-shot-neighbours",
    task_run_name="place new labels of {version}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_input_error,
)
def zero_shot_neighbours(store: str, version: str, parent: str, k: int = 5) -> list[dict[str, Any]]:
    """Each label of ``version`` absent from ``parent``, with its ``k`` nearest labels of ``parent``.

    The nearest labels come from the library's cosine decoder over the new version's known-label rows: a new
    label's vector is where its co-occurrences put it, which is what lets a model predict it at once.
    """
    from pmi_pipeline.decode import CosineDecoder
    from pmi_pipeline.store import EmbeddingStore

    s = EmbeddingStore(store)
    new_version = s.read(version)
    known = set(s.read(parent).labels)
    new_rows = [i for i, label in enumerate(new_version.labels) if label not in known]
    known_rows = [i for i, label in enumerate(new_version.labels) if label in known]
    if not new_rows or not known_rows:
        return []
    decoder = CosineDecoder(new_version.embedding[known_rows])
    cosines, nearest = decoder.topk(new_version.embedding[new_rows], min(k, len(known_rows)))
    rows = [
        {
            "label": new_version.labels[row],
            "count": int(new_version.label_counts[row]),
            "nearest": ", ".join(
                f"{new_version.labels[known_rows[j]]} ({c:.2f})" for j, c in zip(idx, cos, strict=True)
            ),
        }
        for row, idx, cos in zip(new_rows, nearest.tolist(), cosines.tolist(), strict=True)
    ]
    return sorted(rows, key=lambda r: -r["count"])


@task(
    name="re-evaluate-model",
    task_run_name="re-evaluate with {version}",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_input_error,
)
def reevaluate(run_dir: str, store: str, version: str, device: str = "auto") -> dict[str, Any]:
    """The model in ``run_dir`` (trained on an older version) evaluated as trained and with ``version``.

    For the cosine head the model's outputs are decoded against the new version's (aligned) embedding and
    scored over its vocabulary, new labels included; the BCE head does not depend on the embedding.
    """
    from flows.train import evaluate_with_version
    from pmi_pipeline.train import evaluate_run

    as_trained = evaluate_run(run_dir, device=device)
    with_new = evaluate_with_version(run_dir, store, version, device=device)
    return {"as_trained": as_trained, "with_new_version": with_new}


def _alignment_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    alignment = summary.get("alignment") or {}
    rows = [
        {"quantity": "version", "value": summary.get("version")},
        {"quantity": "parent", "value": summary.get("parent") or alignment.get("parent")},
    ]
    rows += [
        {"quantity": key.replace("_", " "), "value": value}
        for key, value in alignment.items()
        if key != "parent" and not isinstance(value, list | dict)
    ]
    return rows


def _reembed_run_name() -> str:
    return f"re-embed {Path(flow_run.parameters['store']).name}"


@flow(name="re-embed", flow_run_name=_reembed_run_name, task_runner=dask_task_runner(), log_prints=True)
def reembed_flow(
    shards: list[str],
    store: str,
    params: dict[str, Any] | None = None,
    counts_cache: str | None = None,
    evaluate_run: str | None = None,
    zero_shot_k: int = 5,
) -> dict[str, Any]:
    """Add the shards not yet counted to ``store`` as a new, aligned version.

    ``evaluate_run``: a training run directory; its model is re-evaluated with the new version. Returns the
    version's summary (``version`` None when nothing was new), with ``zero_shot`` and ``evaluation`` when made.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    step = count_new_shards(shards, store, counts_cache)
    summary = publish_and_report(store, step, params, t0)
    version = summary.get("version")
    if version is None:
        return summary
    if summary.get("alignment"):
        create_table_artifact(
            _alignment_rows(summary),
            key="reembed-alignment",
            description=f"{version} aligned to {summary.get('parent')} (orthogonal Procrustes on shared labels)",
        )
    parent = summary.get("parent")
    if parent and zero_shot_k > 0:
        neighbours = zero_shot_neighbours(store, version, parent, zero_shot_k)
        neighbours = neighbours[:ZERO_SHOT_ROWS]
        summary["zero_shot"] = neighbours
        if neighbours:
            create_table_artifact(
                neighbours,
                key="reembed-zero-shot",
                description=f"Labels new in {version} and their nearest labels of {parent}",
            )
        logger.info("%d new label(s) placed in %s", len(neighbours), version)
    if evaluate_run:
        evaluation = reevaluate(evaluate_run, store, version)
        summary["evaluation"] = evaluation
        old, new = evaluation["as_trained"], evaluation["with_new_version"]
        create_table_artifact(
            [{"metric": k, "as trained": round(old[k], 3), version: round(new[k], 3)} for k in old if k in new],
            key="reembed-evaluation",
            description=f"{evaluate_run}: test metrics (%) with the version it was trained on and with {version}",
        )
        logger.info(
            "re-evaluated %s: P@1 %.2f as trained, %.2f with %s",
            evaluate_run,
            old.get("P@1", float("nan")),
            new.get("P@1", float("nan")),
            version,
        )
    return summary


def _watch_run_name() -> str:
    return f"watch {Path(flow_run.parameters['shard_dir']).name}"


@flow(name="watch-shards", flow_run_name=_watch_run_name, log_prints=True)
def watch_shards_flow(
    shard_dir: str,
    store: str,
    params: dict[str, Any] | None = None,
    counts_cache: str | None = None,
    evaluate_run: str | None = None,
) -> dict[str, Any]:
    """One poll: start ``re-embed`` on ``shard_dir`` if it holds a shard that the store has not counted."""
    logger = get_run_logger()
    if not Path(shard_dir).is_dir():
        logger.warning("%s is not a directory (yet): nothing to watch", shard_dir)
        return {"new": [], "version": None}
    new = list(select_new_shards(store, find_shards([shard_dir])))
    if not new:
        logger.info("no new shard in %s", shard_dir)
        return {"new": [], "version": None}
    logger.info("%d new shard(s) in %s: re-embedding", len(new), shard_dir)
    summary = reembed_flow(
        shards=[shard_dir], store=store, params=params, counts_cache=counts_cache, evaluate_run=evaluate_run
    )
    return {"new": new, "version": summary.get("version"), "summary": summary}
