"""The ``embed`` flow: count shards on Dask, publish a store version, report it.

Steps (each a Prefect task, so each shows in the UI with its own state and logs):

1. ``find-shards``: expand the shard specs (files, directories, globs, import directories).
2. ``select-new-shards``: drop the shards whose content hash is already in the store's manifest.
3. ``count-shard`` (one per new shard, submitted to the DaskTaskRunner): count and save the shard's counts to
   ``<counts cache>/<hash>.npz``; the task is cached by the shard's content hash, so a shard counted by an
   earlier run (of any flow) shows as *Cached* and is not read again. A shard that breaks the contract is
   reported, not retried, and the other shards go on.
4. ``publish-version``: sum the new counts, add them to the latest version's, compute PMI, factorize (on
   the same Dask cluster), align to the parent version and publish atomically; retried on failure (a failed
   attempt leaves the previous version intact).

Artifacts: ``embed-summary`` (corpus and vocabulary size, dimension, store version), ``embed-eigenvalues``,
and the progress of the counting (``embed-counting``) and of the factorization (``embed-factorization``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import flow_run, task_run

from flows import cluster_client, dask_task_runner, retry_unless_input_error

if TYPE_CHECKING:
    from pmi_pipeline.embed import EmbedParams

COUNTS_CACHE_SUFFIX = ".shard-counts"


def default_counts_cache(store: str | Path) -> Path:
    """Per-shard counts live beside the store (``<store>.shard-counts/``), never inside the Zarr hierarchy."""
    store = Path(store).resolve()
    return store.with_name(store.name + COUNTS_CACHE_SUFFIX)


# ------------------------------------------------------------------------------------------------------------
# Tasks


@task(
    name="find-shards",
    task_run_name="find shards",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_input_error,
)
def find_shards(specs: list[str]) -> list[str]:
    """Expand shard specs into Parquet files (sorted, de-duplicated)."""
    from pmi_pipeline.shards import discover_shards

    return [str(p) for p in discover_shards(specs)]


@task(
    name="select-new-shards",
    task_run_name="select new shards",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_input_error,
)
def select_new_shards(store: str, shards: list[str]) -> dict[str, str]:
    """The shards whose content hash is not in the store's latest manifest (all of them for a new store), each
    with that hash: the count task's cache key, and what it checks the bytes it counts against."""
    from pmi_pipeline.embed import split_new
    from pmi_pipeline.store import EmbeddingStore

    listing = split_new(shards, EmbeddingStore(store).read_manifest())
    for error in listing.changed:  # reported again, as rejected, by the run that publishes
        get_run_logger().error("rejected %s", error)
    return {str(p): digest for p, digest in listing.new.items()}


def _shard_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    """Cache a shard's counts by its content hash, not by its name or the run.

    Also keyed on where the counts file is kept and on the library's version (a new release may count
    differently), so a cache hit always names a file this run can use. The hash is the one the shard was listed
    with, when given (no second read of the file); the task then counts only those bytes.
    """
    from pmi_pipeline import __version__
    from pmi_pipeline.shards import shard_hash

    where = hashlib.sha256(str(Path(parameters["cache_dir"]).resolve()).encode()).hexdigest()[:12]
    digest = parameters.get("digest") or shard_hash(parameters["shard"])
    return f"pmi-count-{__version__}-{digest.removeprefix('sha256:')}-{where}"


def example_ids_path(counts_path: Path) -> Path:
    return counts_path.with_name(counts_path.name.removesuffix(".npz") + ".ids.npy")


def save_example_ids(counts_path: Path, ids: np.ndarray) -> None:
    tmp = counts_path.with_name(f".{counts_path.name}.ids.tmp.npy")
    np.save(tmp, ids)
    tmp.replace(example_ids_path(counts_path))


def _count_run_name() -> str:
    return f"count {Path(task_run.parameters['shard']).name}"


@task(
    name="count-shard",
    task_run_name=_count_run_name,
    cache_key_fn=_shard_cache_key,
    persist_result=True,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_input_error,
)
def count_shard_task(shard: str, cache_dir: str, digest: str | None = None) -> dict[str, Any]:
    """Count one shard into ``cache_dir/<hash>.npz``; return the shard, its hash, the counts file or error.

    A shard that breaks the contract, or whose content is no longer ``digest`` (the hash it was listed with), is
    returned as an error (not raised): it is never worth a retry and must not stop the other shards.
    """
    from pmi_pipeline.cooccurrence import count_shard_with_ids
    from pmi_pipeline.errors import ShardError

    logger = get_run_logger()
    try:
        counts, ids = count_shard_with_ids(shard, expected_sha256=digest)
    except ShardError as exc:
        logger.error("rejected %s", exc)
        return {"shard": shard, "hash": None, "counts": None, "error": str(exc)}
    digest = next(iter(counts.manifest))  # the hash of the bytes that were counted
    out = Path(cache_dir) / f"{digest.removeprefix('sha256:')}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_example_ids(out, ids)  # first: a counts file without its ids is never taken as complete
    counts.save(out)
    logger.info(
        "%s: %d examples, %d labels, %d pairs",
        Path(shard).name,
        counts.n_examples,
        counts.n_labels,
        counts.n_pairs,
    )
    return {"shard": shard, "hash": digest, "counts": str(out), "error": None}


@task(
    name="publish-version",
    task_run_name=lambda: f"publish {Path(task_run.parameters['store']).name}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_input_error,
)
def publish_version(store: str, counted: list[dict[str, Any]], params: dict[str, Any] | None) -> dict[str, Any]:
    """Add the new shards' counts to the store's and publish a new version (PMI, factorization, alignment)."""
    from pmi_pipeline.cooccurrence import Counts, count_shard_with_ids
    from pmi_pipeline.embed import EmbedParams, publish_counts

    logger = get_run_logger()
    parts = []
    for item in counted:
        path = Path(item["counts"])
        ids_path = example_ids_path(path)
        if path.exists() and ids_path.exists():
            counts = Counts.load(path)
            counts.manifest = {k: {**v, "path": item["shard"]} for k, v in counts.manifest.items()}
            parts.append((counts, np.load(ids_path)))
        else:  # a cached result whose files have been removed since: count again rather than fail
            parts.append(count_shard_with_ids(item["shard"]))
    embed_params = EmbedParams.from_dict(params) if params else _parent_params(store)
    progress = create_progress_artifact(
        0.0, key="embed-factorization", description=f"Factorizing the PMI matrix (k={embed_params.dim})"
    )

    def report(stage: str, done: int, total: int) -> None:
        if stage == "factorize" and total:
            update_progress_artifact(progress, min(99.0, 100.0 * done / total))

    t0 = time.perf_counter()
    with cluster_client() as client:
        result = publish_counts(store, parts, embed_params, client=client, progress=report)
    update_progress_artifact(progress, 100.0)
    logger.info("published %s in %.1f s", result.version, time.perf_counter() - t0)
    return result.to_dict()


def _parent_params(store: str) -> EmbedParams:
    """A new version keeps its parent's parameters unless told otherwise (library defaults for the first)."""
    from pmi_pipeline.embed import EmbedParams
    from pmi_pipeline.store import EmbeddingStore

    existing = EmbeddingStore(store)
    if existing.latest is None:
        return EmbedParams()
    return EmbedParams.from_dict(existing.read_attrs()["params"])


def params_changed(store: str, params: dict[str, Any] | None) -> bool:
    """True when ``params`` are given and differ from the latest version's (a reason to publish anyway)."""
    from pmi_pipeline.embed import EmbedParams
    from pmi_pipeline.store import EmbeddingStore

    existing = EmbeddingStore(store)
    if params is None or existing.latest is None:
        return False
    return EmbedParams.from_dict(params).to_dict() != existing.read_attrs().get("params")


# ------------------------------------------------------------------------------------------------------------
# Artifacts


def _report(store: str, summary: dict[str, Any]) -> None:
    version = summary.get("version")
    rows = [
        {"quantity": "store", "value": store},
        {"quantity": "store version", "value": version or "(unchanged: no new shard)"},
        {"quantity": "parent version", "value": summary.get("parent") or "-"},
        {"quantity": "shards found", "value": summary["n_shards"]},
        {"quantity": "shards counted (new)", "value": summary["n_new_shards"]},
        {"quantity": "shards rejected", "value": len(summary["rejected"])},
        {"quantity": "examples (corpus)", "value": summary.get("n_examples")},
        {"quantity": "labels (vocabulary)", "value": summary.get("n_labels")},
        {"quantity": "embedding dimension", "value": summary.get("dim")},
        {"quantity": "positive eigenvalues", "value": summary.get("n_positive_eigenvalues")},
        {"quantity": "seconds", "value": round(summary["seconds"], 1)},
    ]
    create_table_artifact(rows, key="embed-summary", description=f"Embedding of {store}: {version}")
    eigenvalues = summary.get("eigenvalues") or []
    if eigenvalues:
        create_table_artifact(
            [{"rank": i + 1, "eigenvalue": round(float(v), 6)} for i, v in enumerate(eigenvalues)],
            key="embed-eigenvalues",
            description=f"Eigenvalues of the PMI matrix kept in {version} (before the power is applied)",
        )
    if summary["rejected"]:
        lines = "\n".join(f"- {e}" for e in summary["rejected"])
        create_markdown_artifact(f"# Rejected shards\n\n{lines}\n", key="embed-rejected-shards")


# ------------------------------------------------------------------------------------------------------------
# Flow


def count_new_shards(shards: list[str], store: str, counts_cache: str | None) -> dict[str, Any]:
    """Steps 1-3 inside a flow: find the shards, keep the new ones, count each on the task runner.

    Returns ``{"shards", "new", "counted", "rejected"}``; shared by ``embed`` and ``re-embed``.
    """
    logger = get_run_logger()
    cache_dir = str(Path(counts_cache) if counts_cache else default_counts_cache(store))
    found = find_shards(shards)
    new = select_new_shards(store, found)
    logger.info("%d shard(s) found, %d new", len(found), len(new))
    counted: list[dict[str, Any]] = []
    rejected: list[str] = []
    if new:
        progress = create_progress_artifact(
            0.0, key="embed-counting", description=f"Counting {len(new)} new shard(s) into {cache_dir}"
        )
        paths = list(new)
        futures = {count_shard_task.submit(path, cache_dir, new[path]): i for i, path in enumerate(paths)}
        for done, future in enumerate(as_completed(list(futures)), start=1):
            i = futures[future]
            # A cached result may come from the same content under another name: report this run's path.
            item = {**future.result(), "shard": paths[i], "index": i}
            if item["error"]:
                rejected.append(item["error"])
            else:
                counted.append(item)
            update_progress_artifact(progress, 100.0 * done / len(new))
        counted.sort(key=lambda item: item["index"])
    return {"shards": found, "new": list(new), "counted": counted, "rejected": rejected}


def publish_and_report(store: str, step: dict[str, Any], params: dict[str, Any] | None, t0: float) -> dict[str, Any]:
    """Step 4 and the artifacts; returns the published version's summary (``version`` None if nothing new)."""
    logger = get_run_logger()
    if step["counted"] or params_changed(store, params):
        if not step["counted"]:
            logger.info("no new shard, but new parameters: publishing the same counts again")
        summary = publish_version.submit(store, step["counted"], params).result()
    else:
        logger.info("nothing new to publish in %s", store)
        summary = {"version": None}
    summary.update(
        n_shards=len(step["shards"]),
        n_new_shards=len(step["counted"]),
        rejected=sorted(set(step["rejected"]) | set(summary.get("rejected") or [])),
        seconds=time.perf_counter() - t0,
    )
    _report(store, summary)
    return summary


def _embed_run_name() -> str:
    store = Path(flow_run.parameters["store"]).name
    shards = flow_run.parameters["shards"]
    source = Path(shards[0]).name if len(shards) == 1 else f"{len(shards)} specs"
    return f"embed {source} -> {store}"


@flow(name="embed", flow_run_name=_embed_run_name, task_runner=dask_task_runner(), log_prints=True)
def embed_flow(
    shards: list[str],
    store: str,
    params: dict[str, Any] | None = None,
    counts_cache: str | None = None,
) -> dict[str, Any]:
    """Count the shards not yet in ``store`` and publish a new version of it.

    ``shards``: files, directories, globs or import directories. ``params``: the embedding parameters
    (:class:`pmi_pipeline.embed.EmbedParams` as a dict; None: the library's defaults, or the parent's).
    ``counts_cache``: where per-shard counts are kept (default ``<store>.shard-counts``).
    Returns the version's summary: ``version`` (None when no shard was new), sizes, eigenvalues, alignment.
    """
    t0 = time.perf_counter()
    step = count_new_shards(shards, store, counts_cache)
    return publish_and_report(store, step, params, t0)
