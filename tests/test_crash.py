"""Crashes, killed workers and concurrent writers: real SIGKILLs, real processes, nothing lost or counted twice.

Every crash here is a real ``SIGKILL`` of a real ``pmi-pipeline embed`` process, at a named point
(:mod:`pmi_pipeline.faults`): no cleanup runs, as in a power cut or the OOM killer. After each kill the store must
hold a complete ``latest`` or none, and the next run must end where an uninterrupted run ends: the same counts
(nothing lost, nothing counted twice), the same embedding, a store ``check`` finds nothing wrong with.
docs/reliability.md summarises what these tests and ``bench/crash_loop.py`` tried and measured.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

from pmi_pipeline.check import check_store
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.embed import EmbedParams, embed
from pmi_pipeline.faults import ENV, POINTS
from pmi_pipeline.shards import discover_shards
from pmi_pipeline.store import EmbeddingStore
from pmi_pipeline.synth import SynthConfig, write_corpus

PARAMS = EmbedParams(dim=8)
N_SHARDS = 8
RUN_TIMEOUT = 180  # seconds for one embed process; a run takes 2-8 s on two busy cores


# --- fixtures: a small corpus of several shards, and what an uninterrupted run makes of it -------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """8 shards of 1000 examples over 300 labels (more than the sketch width, so the power loop runs)."""
    out = tmp_path_factory.mktemp("crash") / "corpus"
    config = SynthConfig(n_examples=8000, n_labels=300, mean_labels=4.0, shard_size=1000, seed=7)
    write_corpus(out, config, progress=False)
    paths = discover_shards([out])
    assert len(paths) == N_SHARDS
    return paths


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory):
    """Counts of all shards counted in this process, and the store an uninterrupted run publishes."""
    counts = count_shards(corpus, None).counts
    path = tmp_path_factory.mktemp("clean") / "store"
    assert embed(corpus, path, PARAMS).version == "v0001"
    store = EmbeddingStore(path)
    assert store.read_counts().equals(counts) and check_store(path) == []
    return {"counts": counts, "version": store.read(), "path": path}


@pytest.fixture(scope="module")
def half(corpus, tmp_path_factory):
    """A store whose v0001 holds the first four shards, and the v0002 an uninterrupted run adds to it."""
    path = tmp_path_factory.mktemp("half") / "store"
    assert embed(corpus[:4], path, PARAMS).version == "v0001"
    grown = path.parent / "grown"
    shutil.copytree(path, grown)
    assert embed(corpus, grown, PARAMS).version == "v0002"
    return {
        "path": path,
        "counts": count_shards(corpus[:4], None).counts,
        "v0001": EmbeddingStore(path).read("v0001"),
        "v0002": EmbeddingStore(grown).read("v0002"),
    }


# --- helpers ----------------------------------------------------------------------------------------------


def embed_command(shards, store, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "pmi_pipeline", "embed", *map(str, shards), "--store", str(store)]
    return [*command, "--dim", "8", "-q", *extra]


def _session(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a session: what a killed run could have left behind."""
    alive = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return alive


def run_killed(shards, store, point: str, *extra: str) -> subprocess.CompletedProcess:
    """Run ``embed`` with a kill point set; assert it died by SIGKILL and left no process behind."""
    env = {**os.environ, ENV: point}
    proc = subprocess.Popen(
        embed_command(shards, store, *extra),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: its Dask workers are findable, and only ours are touched
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, f"{point}: exit {proc.returncode}, not SIGKILL\n{err[-3000:]}"
    # Workers of a killed LocalCluster lose their nanny and scheduler and must exit by themselves.
    deadline = time.monotonic() + 60
    while (left := _session(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"{point}: processes left running after the kill: {[p.cmdline() for p in left]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_readable_latest(store_path: Path) -> str | None:
    """The invariant at every instant: no store, or no ``latest``, or a ``latest`` that is complete and sound."""
    store = EmbeddingStore(store_path)
    if not store.exists():
        assert store.latest is None and store.versions() == []
        return None
    errors = [p for p in check_store(store_path) if p.severity == "error"]
    assert errors == [], errors  # warnings (leftovers of the killed writer) are allowed
    latest = store.latest
    if latest is not None:
        assert latest in store.versions()
        version = store.read()
        assert version.embedding.shape == (len(version.labels), version.dim) and version.dim > 0
        assert store.read_counts().n_examples == version.attrs["n_examples"]
    return latest


def assert_no_leftovers(store_path: Path) -> None:
    store = EmbeddingStore(store_path)
    assert check_store(store_path) == []  # not even a warning
    assert store.unpublished() == []
    assert list((store_path / "versions").glob(".tmp-*")) == []
    assert list(store_path.rglob(".zarr.json.*.tmp")) == []


def assert_same_counts(got, want) -> None:
    assert got.equals(want), "counts differ from an uninterrupted run's"
    assert sorted(got.manifest) == sorted(want.manifest)  # every shard once, none twice
    assert got.n_examples == want.n_examples and got.n_annotations == want.n_annotations


def assert_same_embedding(got, want) -> None:
    assert got.labels == want.labels
    np.testing.assert_array_equal(got.label_counts, want.label_counts)
    np.testing.assert_allclose(got.eigenvalues, want.eigenvalues, rtol=1e-8)
    np.testing.assert_allclose(got.embedding, want.embedding, rtol=1e-4, atol=1e-5)


# --- a. crash anywhere in a first run ----------------------------------------------------------------------

# (kill point, what the store looks like right after the kill)
FIRST_RUN_POINTS = [
    ("count:shard-done", "nothing"),  # the first shard is counted
    ("count:shard-done:3", "nothing"),  # 3 of 8 shards counted
    ("count:merged", "nothing"),
    ("factorize:iteration", "nothing"),
    ("factorize:iteration:2", "nothing"),
    ("publish:store-created", "nothing"),  # versions/ exists, the root metadata does not yet
    ("publish:arrays-written", "tmp"),  # a complete version under versions/.tmp-*, not renamed
    ("publish:renamed", "unpublished"),  # versions/v0001 in place, latest not yet set
    ("publish:latest-set", "published"),  # latest = v0001, the lock still held
]
DASK_POINTS = ["count:shard-done", "count:shard-done:3", "count:merged"]  # counting is where Dask is
CASES = [pytest.param(p, s, False, id=f"{p}-no-dask") for p, s in FIRST_RUN_POINTS] + [
    pytest.param(p, s, True, id=f"{p}-dask") for p, s in FIRST_RUN_POINTS if p in DASK_POINTS
]


def test_every_kill_point_is_tried():
    tried = {p.rsplit(":", 1)[0] if p.rsplit(":", 1)[-1].isdigit() else p for p, _ in FIRST_RUN_POINTS}
    assert tried == set(POINTS)


@pytest.mark.parametrize(("point", "state", "dask"), CASES)
def test_killed_first_run_recovers(corpus, clean, tmp_path, point, state, dask):
    store_path = tmp_path / "store"
    run_killed(corpus, store_path, point, *(["--workers", "2"] if dask else ["--no-dask"]))

    store = EmbeddingStore(store_path)
    latest = assert_readable_latest(store_path)
    if state == "nothing":
        assert latest is None and not store.exists()
    elif state == "tmp":
        assert latest is None and store.versions() == []
        assert [p.name[:10] for p in (store_path / "versions").glob(".tmp-*")] == [".tmp-v0001"]
    elif state == "unpublished":
        assert latest is None and store.unpublished() == ["v0001"]
    else:
        assert latest == "v0001" and store.versions() == ["v0001"]
        assert_same_counts(store.read_counts(), clean["counts"])

    result = embed(corpus, store_path, PARAMS)  # the next run, without the kill
    assert result.version == (None if state == "published" else "v0001")
    if result.version is None:
        assert "nothing new" in result.message
    assert store.versions() == ["v0001"] and store.latest == "v0001"
    assert_no_leftovers(store_path)
    assert_same_counts(store.read_counts(), clean["counts"])
    assert_same_embedding(store.read(), clean["version"])


# --- b. crash during an incremental run ----------------------------------------------------------------------


INCREMENTAL_POINTS = ("count:shard-done:2", "factorize:iteration", "publish:renamed", "publish:latest-set")


@pytest.mark.parametrize("point", INCREMENTAL_POINTS)
def test_killed_incremental_run_keeps_the_previous_version(corpus, clean, half, tmp_path, point):
    store_path = tmp_path / "store"
    shutil.copytree(half["path"], store_path)
    run_killed(corpus, store_path, point, "--no-dask")

    store = EmbeddingStore(store_path)
    latest = assert_readable_latest(store_path)
    assert latest == ("v0002" if point == "publish:latest-set" else "v0001")
    # the version readers had before the crash is untouched
    assert_same_embedding(store.read("v0001"), half["v0001"])
    assert_same_counts(store.read_counts("v0001"), half["counts"])
    if point == "publish:renamed":
        assert store.unpublished() == ["v0002"]

    result = embed(corpus, store_path, PARAMS)
    assert result.version == (None if point == "publish:latest-set" else "v0002")
    assert store.versions() == ["v0001", "v0002"] and store.latest == "v0002"
    assert_no_leftovers(store_path)
    assert_same_counts(store.read_counts(), clean["counts"])
    assert_same_embedding(store.read(), half["v0002"])
    assert store.read_attrs()["parent"] == "v0001"


# --- c. a Dask worker killed mid-count -------------------------------------------------------------------------


class KillFirstShardHolder(SchedulerPlugin):
    """SIGKILLs the worker holding the first shard's finished counts, the moment the scheduler records them."""

    name = "kill-first-shard-holder"

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.killed: tuple[str, str, int] | None = None  # (key, worker address, pid)
        self.in_memory: Counter[str] = Counter()  # count-batch key -> times it reached memory
        self.removed: list[str] = []

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, stimulus_id, **kwargs) -> None:
        if finish != "memory" or not str(key).startswith("count-batch"):
            return
        self.in_memory[str(key)] += 1
        if self.killed is None:
            (worker,) = self.scheduler.tasks[key].who_has
            self.killed = (str(key), worker.address, self.pids[worker.address])
            os.kill(self.pids[worker.address], signal.SIGKILL)

    def remove_worker(self, scheduler, worker, *, stimulus_id, **kwargs) -> None:
        self.removed.append(worker)


@pytest.fixture(scope="module")
def cluster():
    from pmi_pipeline.dask_cluster import dask_client

    with dask_client(n_workers=2) as client:
        yield client


@pytest.fixture
def worker_killer(cluster):
    """Armed on the running cluster, with both workers up (the nanny restarts the one killed before)."""
    cluster.wait_for_workers(2, timeout=120)
    pids = cluster.run(os.getpid)
    assert len(pids) == 2
    cluster.register_plugin(KillFirstShardHolder(pids))
    yield cluster.cluster.scheduler.plugins[KillFirstShardHolder.name]  # the scheduler runs in this process
    cluster.unregister_scheduler_plugin(KillFirstShardHolder.name)


def assert_worker_died_and_work_was_redone(plugin: KillFirstShardHolder) -> None:
    assert plugin.killed is not None, "no count-batch task reached memory"
    key, address, pid = plugin.killed
    assert address in plugin.removed, "the scheduler never noticed the dead worker"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert plugin.in_memory[key] >= 2, f"{key} was lost with its worker but not recomputed"
    assert len(plugin.in_memory) == N_SHARDS  # one task per shard, each finished (once, or again after the kill)


def test_killed_worker_loses_nothing(corpus, clean, cluster, worker_killer):
    result = count_shards(corpus, cluster)
    assert_worker_died_and_work_was_redone(worker_killer)
    assert result.rejected == []
    assert_same_counts(result.counts, clean["counts"])
    assert result.counts.labels.tolist() == count_shards(corpus, None).counts.labels.tolist()


def test_killed_worker_during_embed(corpus, clean, cluster, worker_killer, tmp_path):
    result = embed(corpus, tmp_path / "store", PARAMS, cluster)
    assert_worker_died_and_work_was_redone(worker_killer)
    assert result.version == "v0001"
    assert_no_leftovers(tmp_path / "store")
    assert_same_counts(EmbeddingStore(tmp_path / "store").read_counts(), clean["counts"])


# --- d. concurrent writers ---------------------------------------------------------------------------------------


def start_embed(shards, store, log_dir: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    out, err = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        proc = subprocess.Popen(embed_command(shards, store, "--no-dask", *extra), stdout=fo, stderr=fe, env=env)
    return proc, out, err


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 120, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def waiting_for_me(err: Path) -> bool:
    return f"waiting for the writer lock held by pid {os.getpid()} " in err.read_text()


def test_concurrent_runs_take_turns(corpus, clean, tmp_path):
    store_path = tmp_path / "store"
    with EmbeddingStore(store_path).lock():  # both start while the store is locked, so they surely overlap
        runs = [start_embed(corpus, store_path, tmp_path, f"run{i}") for i in range(2)]
        for proc, _, err in runs:
            wait_for(lambda err=err: waiting_for_me(err), "it waited for the lock", proc)
    assert [finish(proc) for proc, _, _ in runs] == [0, 0]
    outputs = sorted(out.read_text() for _, out, _ in runs)
    assert outputs[0].startswith("nothing new: all 8 shard(s) are already counted in v0001")
    assert outputs[1].startswith("published v0001")
    store = EmbeddingStore(store_path)
    assert store.versions() == ["v0001"] and store.latest == "v0001"
    assert_no_leftovers(store_path)
    assert_same_counts(store.read_counts(), clean["counts"])


def test_no_wait_fails_clearly_while_another_run_publishes(corpus, clean, tmp_path):
    store_path = tmp_path / "store"
    lock_file = store_path / ".lock"
    with EmbeddingStore(store_path).lock():
        first, out, err = start_embed(corpus, store_path, tmp_path, "first")
        wait_for(lambda: waiting_for_me(err), "it waited for the lock", first)
    try:
        # The first run takes the lock; stop it there, mid-run, so that it surely still holds it.
        wait_for(lambda: f"pid {first.pid} " in lock_file.read_text(), "it took the lock", first, interval=0.002)
        os.kill(first.pid, signal.SIGSTOP)
        assert lock_file.read_text().startswith(f"pid {first.pid} since ")
        second = subprocess.run(
            embed_command(corpus, store_path, "--no-dask", "--no-wait"),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env={k: v for k, v in os.environ.items() if k != ENV},
        )
        assert second.returncode == 2
        assert f"locked by pid {first.pid} since " in second.stderr
        assert "another writer is publishing to this store" in second.stderr and "Traceback" not in second.stderr
        assert not EmbeddingStore(store_path).unpublished()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert finish(first) == 0 and out.read_text().startswith("published v0001")
    store = EmbeddingStore(store_path)
    assert store.versions() == ["v0001"]
    assert_no_leftovers(store_path)
    assert_same_counts(store.read_counts(), clean["counts"])


def test_concurrent_runs_on_different_shards_add_up(corpus, clean, tmp_path):
    store_path = tmp_path / "store"
    with EmbeddingStore(store_path).lock():
        runs = [
            start_embed(corpus[:4], store_path, tmp_path, "first-half"),
            start_embed(corpus[4:], store_path, tmp_path, "second-half"),
        ]
        for proc, _, err in runs:
            wait_for(lambda err=err: waiting_for_me(err), "it waited for the lock", proc)
    assert [finish(proc) for proc, _, _ in runs] == [0, 0]
    assert sorted(out.read_text()[:15] for _, out, _ in runs) == ["published v0001", "published v0002"]
    store = EmbeddingStore(store_path)
    assert store.versions() == ["v0001", "v0002"] and store.latest == "v0002"
    assert_no_leftovers(store_path)
    assert_same_counts(store.read_counts(), clean["counts"])
    first = store.read_counts("v0001")
    halves = [count_shards(corpus[:4], None).counts, count_shards(corpus[4:], None).counts]
    assert first.equals(halves[0]) or first.equals(halves[1])
