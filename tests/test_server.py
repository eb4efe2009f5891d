"""Against a real Prefect server started by the test (127.0.0.1, a free port, its database in a temp dir)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from prefect_fixtures import REPO_ROOT, PrefectServer, api_get, api_post, prefect_server

pytestmark = pytest.mark.usefixtures("prefect_server")
PARAMS = {"dim": 16, "n_power_iter": 2}
_ = prefect_server  # the fixture, imported for pytest


def test_server_is_healthy_and_serves_the_ui(prefect_server: PrefectServer) -> None:
    assert api_get(prefect_server, "/health") is True
    import urllib.request

    with urllib.request.urlopen(prefect_server.url, timeout=10) as response:
        assert b"<!DOCTYPE html>" in response.read(200)


def test_a_flow_run_reaches_completed_through_the_api(prefect_server: PrefectServer) -> None:
    from prefect import flow

    @flow(name="smoke", flow_run_name="smoke-run")
    def smoke(x: int) -> int:
        return x + 1

    state = smoke(1, return_state=True)
    assert state.is_completed() and state.result() == 2
    runs = api_post(prefect_server, "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["smoke-run"]}}})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    import time

    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")


@pytest.fixture
def served(prefect_server: PrefectServer, tmp_path: Path, bibtex_dir: Path, eurlex_dir: Path):
    """`pmi-pipeline serve` in a subprocess: a watcher polling every 5 s, training deployed to a work pool.

    The watched directory starts with one EUR-Lex shard, already embedded as the store's first version.
    """
    import subprocess
    import sys

    from pmi_pipeline.embed import EmbedParams, embed

    watched, store = tmp_path / "incoming", tmp_path / "store"
    watched.mkdir()
    shutil.copy(eurlex_dir / "annotations" / "part-00000.parquet", watched)
    assert embed([watched], store, EmbedParams(**PARAMS)).version == "v0001"
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable, "-m", "pmi_pipeline", "serve",
        "--shards", str(watched), "--store", str(store),
        "--watch-every", "5", "--cron", "*/30 * * * *",
        "--params", json.dumps(PARAMS),
        "--data", str(bibtex_dir), "--out", str(tmp_path / "out"),
        "--train-pool", "gpu-test",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
    try:
        yield {"watched": watched, "store": store, "log": log, "process": proc}
    finally:
        # SIGINT: the runner stops its runs and pauses the schedules it served.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _deployments(server: PrefectServer) -> dict[str, dict]:
    flows = {f["id"]: f["name"] for f in api_post(server, "/flows/filter", {})}
    return {f"{flows[d['flow_id']]}/{d['name']}": d for d in api_post(server, "/deployments/filter", {})}


def test_serve_creates_deployments_and_the_watcher_reembeds_new_shards(
    prefect_server: PrefectServer, served: dict, eurlex_dir: Path
) -> None:
    from pmi_pipeline.store import EmbeddingStore

    expected = {
        "re-embed/periodic",
        "watch-shards/poll",
        "embed/on-demand",
        "train/on-demand",
        "evaluate/on-demand",
        "pipeline/on-demand",
        "train/gpu",
    }

    def all_there() -> dict | None:
        if served["process"].poll() is not None:
            raise AssertionError(f"serve exited:\n{served['log'].read_text()[-3000:]}")
        found = _deployments(prefect_server)
        return found if expected <= set(found) else None

    deployments = _wait_for(all_there, 60, "the deployments")
    periodic = deployments["re-embed/periodic"]["schedules"]
    assert [s["schedule"]["cron"] for s in periodic] == ["*/30 * * * *"] and periodic[0]["active"]
    poll = deployments["watch-shards/poll"]["schedules"]
    assert [s["schedule"]["interval"] for s in poll] == [5.0] and poll[0]["active"]
    assert deployments["watch-shards/poll"]["parameters"]["shard_dir"] == str(served["watched"].resolve())
    assert deployments["train/gpu"]["work_pool_name"] == "gpu-test"
    assert deployments["pipeline/on-demand"]["parameters"]["train_deployment"] == "train/gpu"
    assert all(d["schedules"] == [] for k, d in deployments.items() if k.endswith("on-demand"))

    # A new shard dropped into the watched directory leads to a new, aligned store version, through a run of
    # the watcher deployment that starts a re-embed subflow; both reach Completed.
    store = EmbeddingStore(served["store"])
    assert store.versions() == ["v0001"]
    shard = eurlex_dir / "annotations" / "part-00001.parquet"
    tmp = served["watched"] / f".{shard.name}.tmp"
    shutil.copy(shard, tmp)
    tmp.rename(served["watched"] / shard.name)  # complete files only, as a writer should
    _wait_for(lambda: store.latest == "v0002", 120, "store version v0002", 1.0)
    assert store.read_attrs("v0002")["alignment"]["parent"] == "v0001"
    assert len(store.read_counts().manifest) == 2

    def reembed_completed() -> list[dict]:
        runs = api_post(prefect_server, "/flow_runs/filter", {"flows": {"name": {"any_": ["re-embed"]}}})
        # Subflows of the watcher on our store (the periodic deployment's scheduled runs are not).
        ours = [
            r for r in runs if r["parameters"]["store"] == str(served["store"].resolve()) and r["parent_task_run_id"]
        ]
        return ours if ours and all(r["state_type"] == "COMPLETED" for r in ours) else None

    (reembed_run,) = _wait_for(reembed_completed, 60, "the re-embed run to complete")
    assert reembed_run["name"] == "re-embed store"
    # The watcher run that started it: the re-embed subflow's parent task belongs to it.
    (parent_task,) = api_post(
        prefect_server, "/task_runs/filter", {"task_runs": {"id": {"any_": [reembed_run["parent_task_run_id"]]}}}
    )

    def watcher_completed() -> dict | None:
        run = api_get(prefect_server, f"/flow_runs/{parent_task['flow_run_id']}")
        return run if run["state_type"] == "COMPLETED" else None

    watcher_run = _wait_for(watcher_completed, 60, "the watcher run to complete")
    assert watcher_run["deployment_id"] == deployments["watch-shards/poll"]["id"]
    assert watcher_run["name"] == "watch incoming"
    artifacts = api_post(
        prefect_server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [reembed_run["id"]]}}}
    )
    assert {"embed-summary", "reembed-alignment", "reembed-zero-shot"} <= {a["key"] for a in artifacts}
