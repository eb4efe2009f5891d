"""``embed`` on a Dask cluster of separate processes, started exactly as on several machines (docs/scale-out.md).

A module fixture starts ``dask scheduler`` and two ``dask worker`` commands (one worker process, one thread each)
as their own process groups on loopback, each in a working directory of its own: like a worker on another
machine, a worker can only open a shard by an absolute path that exists where it runs (on a cluster, a shared
filesystem mounted at the same path everywhere). Nothing is mocked: the CLI runs as a subprocess, the tasks run in
the worker processes, and the results are compared with an in-process run.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, get_task_stream
from test_embed import assert_same_store

from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.dask_cluster import dask_client
from pmi_pipeline.embed import EmbedParams, embed
from pmi_pipeline.shards import discover_shards
from pmi_pipeline.store import EmbeddingStore

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: dask, pmi-pipeline
PARAMS = EmbedParams(dim=16)
WORKER_NAMES = ("w0", "w1")
START_DEADLINE_S = 60.0


@dataclass
class Cluster:
    address: str  # tcp://127.0.0.1:PORT
    scheduler_file: Path  # written by `dask scheduler --scheduler-file`
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen]  # the `dask worker` commands (nannies); each starts one worker process
    client: Client  # for inspecting the cluster only; the code under test makes its own clients
    logs: list[Path]
    root: Path  # the processes' working directories and logs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(BIN / "dask"), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown reaches the worker process under the nanny
        )


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # the group may outlive its leader (a worker process whose nanny has exited)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _start_worker(address: str, name: str, root: Path) -> tuple[subprocess.Popen, Path]:
    """``dask worker ADDRESS``, in a directory of its own: not the repository, so a relative path would not open."""
    log = root / f"{name}.log"
    args = ["worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"]
    args += ["--name", name, "--local-directory", str(root / name / "scratch")]
    return _start(args, root / name, log), log


def _log_tails(logs: list[Path], n_chars: int = 3000) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-n_chars:]}" for p in logs)


def _connect_when_ready(
    address: str, n_workers: int, procs: list[subprocess.Popen], logs: list[Path], client: Client | None = None
) -> Client:
    """A client once the scheduler has ``n_workers`` workers; fails with the logs after ``START_DEADLINE_S``."""
    deadline = time.monotonic() + START_DEADLINE_S
    seen, error = 0, "timed out"
    while time.monotonic() < deadline:
        dead = [" ".join(map(str, p.args[1:3])) for p in procs if p.poll() is not None]
        if dead:
            error = f"exited early: {dead}"
            break
        try:
            client = client or Client(address, timeout="10s")
            seen = len(client.scheduler_info()["workers"])
        except OSError as exc:  # the scheduler is not listening yet
            error = repr(exc)
        if seen == n_workers:
            return client
        time.sleep(0.5)
    if client is not None:
        client.close()
    pytest.fail(f"{seen} of {n_workers} Dask workers after {START_DEADLINE_S:.0f} s: {error}\n{_log_tails(logs)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``dask scheduler`` + 2 x ``dask worker`` on 127.0.0.1, separate processes, as a user starts them."""
    root = tmp_path_factory.mktemp("dask-cluster")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler_file = root / "scheduler.json"
    logs = [root / "scheduler.log"]
    procs: list[subprocess.Popen] = []
    client = None
    try:
        scheduler_args = ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
        procs.append(_start([*scheduler_args, "--scheduler-file", str(scheduler_file)], root / "scheduler", logs[0]))
        for name in WORKER_NAMES:
            proc, log = _start_worker(address, name, root)
            procs.append(proc)
            logs.append(log)
        client = _connect_when_ready(address, len(WORKER_NAMES), procs, logs)
        yield Cluster(address, scheduler_file, procs[0], procs[1:], client, logs, root)
    finally:
        if client is not None:
            client.close()
        _stop(procs[1:])  # workers first, so that they do not spend their death-timeout reconnecting
        _stop(procs[:1])


def _worker_processes(cluster: Cluster) -> dict[str, dict]:
    """Per worker address: name, pid, parent pid (the `dask worker` nanny) and working directory."""
    client = cluster.client
    names = {addr: info["name"] for addr, info in client.scheduler_info()["workers"].items()}
    pids, ppids, cwds = client.run(os.getpid), client.run(os.getppid), client.run(os.getcwd)
    return {a: {"name": names[a], "pid": pids[a], "ppid": ppids[a], "cwd": cwds[a]} for a in names}


def _key(record: dict) -> str:
    """A task-stream record's task key as a string (tuple keys: their name)."""
    return record["key"] if isinstance(record["key"], str) else str(record["key"][0])


def test_cluster_is_separate_processes(cluster):
    workers = _worker_processes(cluster)
    assert sorted(w["name"] for w in workers.values()) == sorted(WORKER_NAMES)
    # each worker process was started by one of the `dask worker` commands, none by this process
    assert sorted(w["ppid"] for w in workers.values()) == sorted(p.pid for p in cluster.workers)
    assert os.getpid() not in {w["pid"] for w in workers.values()}
    assert all(Path(w["cwd"]) != REPO_ROOT for w in workers.values())
    assert json.loads(cluster.scheduler_file.read_text())["address"] == cluster.address


def test_cli_embed_on_the_cluster_equals_in_process(cluster, bibtex_dir, tmp_path):
    """The command a user runs, with a relative shard path: the workers, elsewhere, get absolute ones."""
    store = tmp_path / "s"
    start = time.perf_counter()
    with get_task_stream(cluster.client) as stream:  # every task the scheduler ran meanwhile, whoever sent it
        proc = subprocess.run(
            [
                *(str(BIN / "pmi-pipeline"), "embed", "data/bibtex", "--store", str(store)),
                *("--scheduler", cluster.address, "--dim", "16", "--json", "-q"),
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"{proc.stderr}\n{_log_tails(cluster.logs)}"
    print(f"CLI embed on the external cluster: {seconds:.1f} s wall")
    result = json.loads(proc.stdout)
    train_shard = bibtex_dir / "annotations" / "train" / "part-00000.parquet"
    assert result["version"] == "v0001" and result["rejected"] == []
    assert result["new_shards"] == [str(train_shard.resolve())]
    assert result["n_labels"] == 159 and result["dim"] == 16
    assert EmbeddingStore(store).versions() == ["v0001"]
    # the shard was counted on the external cluster (not on a LocalCluster of the command's own)
    workers = _worker_processes(cluster)
    counted = [r["worker"] for r in stream.data if _key(r).startswith("count-batch-")]
    assert len(counted) == 1 and counted[0] in workers

    reference = tmp_path / "in-process"
    expected = embed([bibtex_dir], reference, PARAMS, client=None)
    assert EmbeddingStore(store).read_counts().equals(EmbeddingStore(reference).read_counts())
    np.testing.assert_allclose(result["eigenvalues"], expected.eigenvalues, rtol=1e-10)
    assert_same_store(reference, store)  # labels, counts, eigenvalues, embedding, parameters


def test_count_tasks_run_on_both_worker_processes(cluster, eurlex_dir, tmp_path):
    """The library through a scheduler file: every count task ran in a worker process, on both workers."""
    shards = discover_shards([eurlex_dir])
    assert len(shards) == 4
    workers = _worker_processes(cluster)
    with dask_client(str(cluster.scheduler_file)) as client, get_task_stream(client) as stream:
        result = embed(shards, tmp_path / "s", PARAMS, client)
    assert result.version == "v0001" and result.rejected == []

    counted = {_key(r): r["worker"] for r in stream.data if _key(r).startswith("count-batch-")}
    assert len(counted) == len(shards)  # one task per shard
    assert set(counted.values()) == set(workers)  # both workers counted shards (idle workers take turns)
    assert all(workers[w]["pid"] != os.getpid() for w in counted.values())
    merges = [r["worker"] for r in stream.data if _key(r).startswith(("_merge_pair", "_merge_tile"))]
    assert merges and set(merges) <= set(workers)  # the partial sums were merged on the workers
    # the factorization's block products ran on the cluster too, not in this process's threads
    assert len(stream.data) > len(counted) + len(merges)
    # and the workers summed exactly what this process counts on its own
    assert EmbeddingStore(tmp_path / "s").read_counts().equals(count_shards(shards).counts)


def test_a_worker_that_dies_mid_run_loses_nothing(cluster, eurlex_dir, tmp_path):
    """A third worker joins, takes count tasks and is killed (SIGKILL, nanny too) as the first shard finishes:
    the scheduler recomputes what it held or was running on the two others, and the counts are exact."""
    shards = discover_shards([eurlex_dir])
    proc, log = _start_worker(cluster.address, "w2", cluster.root)
    try:
        _connect_when_ready(cluster.address, 3, [proc], [*cluster.logs, log], client=cluster.client)
        w2 = next(a for a, info in cluster.client.scheduler_info()["workers"].items() if info["name"] == "w2")
        lost: list[str] = []

        def kill_w2(stage: str, done: int, total: int) -> None:
            if stage == "count" and not lost:
                held = [*cluster.client.processing([w2])[w2], *cluster.client.has_what([w2])[w2]]
                lost.extend(str(k) for k in held if str(k).startswith("count-batch-"))
                os.killpg(proc.pid, signal.SIGKILL)

        with dask_client(cluster.address) as client, get_task_stream(client) as stream:
            result = embed(shards, tmp_path / "s", PARAMS, client, progress=kill_w2)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        _stop([proc])
    assert lost, "w2 was given no count task: nothing was lost, so this proves nothing"
    assert result.version == "v0001" and result.rejected == []
    survivors = {r["worker"] for r in stream.data if _key(r) in lost and r["worker"] != w2}
    assert survivors and w2 not in survivors  # the lost shards were counted again on w0 or w1
    assert EmbeddingStore(tmp_path / "s").read_counts().equals(count_shards(shards).counts)
    assert len(cluster.client.scheduler_info()["workers"]) == len(WORKER_NAMES)


def test_two_runs_at_once_on_one_cluster_count_their_own_shards(cluster, bibtex_dir, eurlex_dir):
    """Two users sharing one cluster: a run that starts while another is counting gets its own shards' counts."""
    bibtex, eurlex = discover_shards([bibtex_dir]), discover_shards([eurlex_dir])
    second = {}

    def start_second_run(done: int, total: int) -> None:  # the first run is between its count tasks
        if not second:
            with dask_client(cluster.address) as other:
                second["counts"] = count_shards(bibtex, other).counts

    with dask_client(cluster.address) as client:
        first = count_shards(eurlex, client, progress=start_second_run).counts
    assert first.equals(count_shards(eurlex).counts)
    assert second["counts"].equals(count_shards(bibtex).counts)


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ("missing/scheduler.json", "no such scheduler file: missing/scheduler.json"),
        ("tcp://127.0.0.1:notaport", "cannot connect to the Dask scheduler tcp://127.0.0.1:notaport"),
    ],
)
def test_a_bad_scheduler_is_a_one_line_error(scheduler, message, bibtex_dir, tmp_path, capsys):
    """And it leaves Dask's default scheduler as it was: a client that failed to connect is not left behind as
    the scheduler of every later ``compute()`` in the process (which would wait on it forever)."""
    from pmi_pipeline.cli import main

    argv = ["embed", str(bibtex_dir), "--store", str(tmp_path / "s"), "--scheduler", scheduler, "-q"]
    before = dask.base.get_scheduler()
    gc.disable()  # the failed client lives in reference cycles: keep it alive, as a busy process may for a while
    try:
        assert main(argv) == 2
        assert dask.base.get_scheduler() == before
    finally:
        gc.enable()
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not EmbeddingStore(tmp_path / "s").exists()
