"""Prefect flows over the :mod:`pmi_pipeline` library: thin wiring, retries, caching, artifacts, schedules.

- ``flows.embed``: ``embed``. One counting task per shard on Dask (prefect-dask), cached by the shard's
  content hash; the publication of the store version, with retries; run artifacts (corpus, vocabulary,
  eigenvalues).
- ``flows.train``: ``train`` and ``evaluate``. Metrics tables, learning curves, progress per epoch.
- ``flows.reembed``: ``re-embed`` (only new shards counted, aligned new version, zero-shot table, optional
  re-evaluation of a model) and ``watch-shards`` (polls a shard directory against the store's manifest).
- ``flows.pipeline``: ``pipeline``: embed, then train and evaluate each head, in order.
- ``flows.deployments``: every deployment and schedule, in one place (``pmi-pipeline serve``).

By default everything runs on Prefect's ephemeral API (a temporary local server, no setup); set
``PREFECT_API_URL`` to use a real server and see the runs in its UI. Importing this package sets, only where
they are unset, the Prefect settings measured to be needed on small machines (they must be in the environment
before Prefect is imported): analytics off, a 90 s start-up timeout for the ephemeral server (the default 20 s
is too short on two busy cores), and the library's loggers forwarded to the run logs. On AMD Zen 4 it also sets
numpy's CPU dispatch, before numpy is imported (:mod:`pmi_pipeline.sort_dispatch`).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pmi_pipeline.sort_dispatch import use_fast_sort

if TYPE_CHECKING:
    from distributed import Client
    from prefect_dask import DaskTaskRunner

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pmi_pipeline",
}
for _key, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
# numpy's AVX2 sort on AMD Zen 4, for this process and the Dask workers it starts, as the pmi-pipeline command
# does (pmi_pipeline.sort_dispatch): only if numpy is not imported yet.
use_fast_sort()

#: Environment variable naming a Dask scheduler (``tcp://host:8786``); unset: an in-process cluster per run.
DASK_ADDRESS_ENV = "PMI_DASK_ADDRESS"
#: ``1`` to give the in-process Dask cluster worker processes instead of threads. Only with a real server: in
#: ephemeral mode every worker process would start its own temporary Prefect server (design, stack notes).
DASK_PROCESSES_ENV = "PMI_DASK_PROCESSES"

_ARTIFACT_KEY_BAD = re.compile(r"[^a-z0-9-]+")


def server_mode() -> bool:
    """True when a Prefect server is configured (``PREFECT_API_URL``), False on the ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def dask_task_runner(address: str | None = None, n_workers: int | None = None) -> DaskTaskRunner:
    """The prefect-dask task runner for the counting flows.

    ``address`` (or ``$PMI_DASK_ADDRESS``) connects to an existing scheduler. Otherwise an in-process
    ``LocalCluster`` is started per flow run: one worker with a thread per core (numpy and scipy release the
    GIL), or, with ``$PMI_DASK_PROCESSES=1`` and a real server, ``n_workers`` worker processes. At least two
    threads each, so that a task waiting on the cluster never starves the work it waits for.
    """
    from prefect_dask import DaskTaskRunner

    address = address or os.environ.get(DASK_ADDRESS_ENV) or None
    if address:
        return DaskTaskRunner(address=address)
    cores = os.cpu_count() or 2
    processes = os.environ.get(DASK_PROCESSES_ENV) == "1" and server_mode()
    if processes:
        workers = n_workers or cores
        kwargs = {"processes": True, "n_workers": workers, "threads_per_worker": max(2, cores // workers)}
    else:
        kwargs = {"processes": False, "n_workers": 1, "threads_per_worker": max(2, cores)}
    # ":0": any free port for the scheduler's HTTP endpoint (None would still try 8787 and warn if taken).
    return DaskTaskRunner(cluster_kwargs={**kwargs, "dashboard_address": ":0"})


@contextlib.contextmanager
def cluster_client() -> Iterator[Client]:
    """A Dask client for the library's own Dask work, from inside a task.

    On a Dask worker (a task submitted to the DaskTaskRunner) this is ``worker_client()``: the same cluster,
    and the task's thread leaves the worker's pool while it waits, so the work it submits can run. Elsewhere,
    a fresh client from :func:`pmi_pipeline.dask_cluster.dask_client` (threads: safe in ephemeral mode).
    """
    from distributed import get_worker, worker_client

    try:
        get_worker()
    except ValueError:
        from pmi_pipeline.dask_cluster import dask_client

        with dask_client(processes=False) as client:
            yield client
        return
    with worker_client() as client:
        yield client


def retry_unless_input_error(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry condition for tasks: retry what can be transient (I/O), never bad input or store state.

    A :class:`pmi_pipeline.errors.PipelineError` (a malformed shard, a missing store, a version a concurrent run
    already published) fails the same way every time, so retrying it only delays the report.
    """
    from pmi_pipeline.errors import PipelineError

    return not isinstance(getattr(state, "data", None), PipelineError)


def artifact_key(*parts: str) -> str:
    """An artifact key from free text: lowercase letters, digits and dashes only (what the API accepts)."""
    key = _ARTIFACT_KEY_BAD.sub("-", "-".join(parts).lower()).strip("-")
    return re.sub("-{2,}", "-", key) or "artifact"


def png_data_uri(path: str | os.PathLike[str]) -> str:
    """A PNG file as a ``data:`` URI, so that an image artifact shows without any file server."""
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
