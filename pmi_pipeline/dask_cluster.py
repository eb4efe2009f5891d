"""The Dask client the pipeline runs on: a LocalCluster by default, any scheduler address for a real cluster."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from pmi_pipeline.errors import PipelineError
from pmi_pipeline.sort_dispatch import AVX512_FEATURES, VARIABLE, numpy_sorts_slowly, sort_environ

log = logging.getLogger(__name__)

#: Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes glibc's mmap threshold at
#: 128 KiB: every large numpy temporary is then a fresh mmap, page-faulted in and unmapped again. Counting took
#: 1.16x as long so (bench/worker_malloc.py). Up to 32 MiB, allocations now come from the heap and are reused.
#: The trim threshold goes up to 32 MiB too: at 64 KiB, glibc gave back the top of the heap at nearly every
#: free, and the next shard's arrays page-faulted it in again: 2-worker counts of 10^8 annotations over 10^3
#: labels took 4.56 s against 3.69 s (medians, bench/count_ab.py; no difference at 10^5 labels; docs/performance.md,
#: eighth pass). A count task still hands its freed heap back once per batch up to 2,048 labels, and each worker once
#: per run over more (``cooccurrence._release_free_heap``, twelfth pass).
#: And one malloc arena: a worker's threads (the task's, its event loop's, Arrow's decoders) each took an arena of
#: their own, each keeping its freed memory; with one, the tree's peak counting 10^8 annotations over 10^3 labels
#: went from 538-541 to 499-508 MiB at the same speed (bench/batch_bytes.py, bench/count_ab.py;
#: docs/performance.md, eleventh pass).
#: For workers started by ``dask worker``, set the same in their environment (docs/scale-out.md).
WORKER_MALLOC = {
    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 32 << 20,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 32 << 20,
    "distributed.nanny.pre-spawn-environ.MALLOC_ARENA_MAX": 1,
}
#: pyarrow's default allocator (mimalloc) keeps the pages a count task's Parquet reads freed, for reuse: a worker
#: counting 10^8 annotations over 10^3 labels peaked at 257-267 MiB with it and 228-232 MiB with glibc's
#: (bench/batch_bytes.py; docs/performance.md, eighth pass). For workers started by ``dask worker``, set
#: ``ARROW_DEFAULT_MEMORY_POOL=system`` in their environment (docs/scale-out.md).
WORKER_ARROW_POOL = {"distributed.nanny.pre-spawn-environ.ARROW_DEFAULT_MEMORY_POOL": "system"}
#: Dask's workers sample the stack of the running task every 10 ms for the dashboard's profile page; each sample
#: takes the GIL from the task. Counting 10^8 annotations on 2 workers took 22.5 s with it and 19.0 s without
#: (medians of 6 interleaved runs, bench/count_ab.py; docs/performance.md, sixth pass). The profile page stays
#: empty for our LocalCluster; for workers started by ``dask worker``, set
#: ``DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False`` in their environment (docs/scale-out.md).
WORKER_PROFILE = {"distributed.worker.profile.enabled": False}
#: Every Dask server (the scheduler, each nanny, each worker) checks its event loop's health every 20 ms, nannies
#: and workers check memory every 100 ms, and the scheduler and workers sample the host every 500 ms. Idle, a
#: 2-worker LocalCluster used 12-13% of a core so (the scheduler's process 6%, each worker 3%), and 3% with these
#: checks every 500 ms and the host's every second (bench/idle_cluster.py). A worker's checks take the GIL from its
#: task: 2-worker counts of 10^8 annotations took 5-17% less time at 10^5 labels and 9% less at 10^3 (medians,
#: bench/count_ab.py; docs/performance.md, sixteenth pass). Event loops blocked for over 3 s are still reported,
#: and a worker near its memory limit is still paused or restarted, within half a second.
QUIET_EVENT_LOOPS = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.system-monitor.interval": "1s",
}


def worker_sort() -> dict[str, str]:
    """Settings for the workers' environment that make numpy sort with its AVX2 kernel on AMD Zen 4, where its
    AVX-512 one took 4-5x as long (:mod:`pmi_pipeline.sort_dispatch`): 2-worker counts of 10^8 annotations over
    10^5 labels took 8.2 s against 16.9 s (docs/performance.md, eighteenth pass). Empty on other CPUs, and where
    this process's environment sets ``NPY_DISABLE_CPU_FEATURES`` already (the workers inherit it)."""
    return {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in sort_environ().items()}


def warn_if_workers_sort_slowly(client: Client) -> list[str]:
    """Log a warning naming the workers whose numpy sorts with its AVX-512 kernel on AMD Zen 4 (workers started
    without ``NPY_DISABLE_CPU_FEATURES``, by ``dask worker``); return their addresses."""
    try:
        seen = client.run(numpy_sorts_slowly, on_error="return")
    except Exception as exc:  # a check, not a reason to fail the run
        log.debug("could not ask the workers how numpy sorts: %s", exc)
        return []
    slow = sorted(worker for worker, value in seen.items() if value is True)
    if slow:
        log.warning(
            "%d of %d Dask workers run on AMD Zen 4 with numpy's AVX-512 sort, which counts pairs about half as fast "
            "as its AVX2 sort there (%s): start them with %s=%r in their environment (docs/scale-out.md)",
            len(slow),
            len(seen),
            ", ".join(slow[:3]) + (", ..." if len(slow) > 3 else ""),
            VARIABLE,
            AVX512_FEATURES,
        )
    return slow


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
    memory_limit: str | float | None = "auto",
) -> Iterator[Client]:
    """Yield a distributed ``Client``; a LocalCluster it started is closed on exit.

    ``scheduler`` is an address such as ``tcp://10.0.0.5:8786`` (a ``dask scheduler`` plus ``dask worker``
    processes on other machines) or a scheduler file path. Otherwise a LocalCluster with one single-threaded worker
    process per core: counting is Python + pyarrow + scipy, which holds the GIL often enough that processes beat
    threads. ``processes=False`` keeps workers in this process (needed where forking is unwelcome).

    The client is not made Dask's default scheduler: the library passes it wherever it computes. A default
    client would outlive a failed connection (Dask registers it before connecting), and every later ``compute()``
    in the process would go to a scheduler that is not there and wait forever.
    """
    if scheduler:
        if os.path.isfile(scheduler):
            kwargs = {"scheduler_file": scheduler}
        elif "://" not in scheduler and (os.sep in scheduler or scheduler.endswith(".json")):
            raise PipelineError(f"no such scheduler file: {scheduler} (or give an address, tcp://HOST:8786)")
        else:
            kwargs = {"address": scheduler}
        try:
            client = Client(**kwargs, timeout="30s", set_as_default=False)
        except (OSError, ValueError) as exc:  # unreachable (OSError, TimeoutError) or not an address
            raise PipelineError(f"cannot connect to the Dask scheduler {scheduler}: {exc}") from exc
        log.info("connected to Dask scheduler %s (%d workers)", scheduler, len(client.scheduler_info()["workers"]))
        warn_if_workers_sort_slowly(client)
        try:
            yield client
        finally:
            client.close()
        return
    n_workers = n_workers or os.cpu_count() or 1
    # Kept until the cluster closes, for workers the nanny restarts too; and undone if the cluster fails to start.
    settings = {**WORKER_MALLOC, **WORKER_ARROW_POOL, **WORKER_PROFILE, **QUIET_EVENT_LOOPS, **worker_sort()}
    with dask.config.set(settings):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=processes,
            dashboard_address=":0",  # a free port: never collide with another cluster on this machine
            memory_limit=memory_limit,
            silence_logs=logging.CRITICAL,  # task errors reach the client as exceptions; the rest is shutdown noise
        )
        # Results straight from the workers that hold them. Through the scheduler (Dask's default, for clients that
        # cannot reach the workers), a result is pickled in-band at protocol 4, the scheduler's: a Counts of 25
        # million pairs took 0.65-0.77 s to reach this process, against 0.07-0.27 s so (docs/performance.md,
        # ninth pass).
        client = Client(cluster, set_as_default=False, direct_to_workers=True)
        log.info("started a local Dask cluster: %d workers x %d threads", n_workers, threads_per_worker)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
