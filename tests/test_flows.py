"""The Prefect flows, run in-process against a real Prefect server started by the tests.

Checked through the server's API, as a user of the UI would see them: flow runs reach Completed, task runs
are cached by shard content, and the artifacts are there. Numerics are the library's and tested there; here
the question is whether the wiring is right: incremental re-embedding gives the same counts as embedding
everything at once, versions are aligned, new labels are placed, and a model survives a re-embedding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect_fixtures import PrefectServer, api_post, prefect_server

_ = prefect_server  # the fixture, imported for pytest

#: Small and fast: the tests are about wiring, not embedding quality.
PARAMS = {"dim": 16, "n_power_iter": 2}


def _flow_run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def _task_runs(server: PrefectServer, flow_run_id: str) -> list[dict]:
    return api_post(server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


def _artifacts(server: PrefectServer, flow_run_id: str) -> dict[str, dict]:
    found = api_post(server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found if a["key"]}


def _flow_run(server: PrefectServer, flow_run_id: str) -> dict:
    (run,) = api_post(server, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return run


@pytest.fixture(scope="module")
def incremental(prefect_server: PrefectServer, eurlex_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Three EUR-Lex shards embedded, then re-embedded with the fourth; and all four embedded at once."""
    from flows.embed import embed_flow
    from flows.reembed import reembed_flow

    root = tmp_path_factory.mktemp("incremental")
    shards = sorted((eurlex_dir / "annotations").glob("part-*.parquet"))
    assert len(shards) == 4
    watched, cache = root / "watched", root / "shard-counts"
    watched.mkdir()
    for shard in shards[:3]:
        shutil.copy(shard, watched)
    # A shard that breaks the contract (an unexpected column): reported, never counted, the others go on.
    pq.write_table(pa.table({"example_id": [1, 2], "tags": ["a", "b"]}), watched / "bad.parquet")
    first = embed_flow(
        shards=[str(watched)],
        store=str(root / "a"),
        params=PARAMS,
        counts_cache=str(cache),
        return_state=True,
    )
    shutil.copy(shards[3], watched)
    second = reembed_flow(shards=[str(watched)], store=str(root / "a"), counts_cache=str(cache), return_state=True)
    full = embed_flow(
        shards=[str(s) for s in shards],
        store=str(root / "b"),
        params=PARAMS,
        counts_cache=str(cache),
        return_state=True,
    )
    return {"root": root, "watched": watched, "first": first, "second": second, "full": full}


def test_embed_flow_completes_with_its_artifacts(prefect_server: PrefectServer, incremental) -> None:
    state = incremental["first"]
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["version"] == "v0001" and summary["n_new_shards"] == 3 and summary["n_labels"] > 1000
    assert (
        len(summary["rejected"]) == 1 and "bad.parquet" in summary["rejected"][0] and "tags" in summary["rejected"][0]
    )
    run_id = _flow_run_id(state)
    run = _flow_run(prefect_server, run_id)
    assert run["state_type"] == "COMPLETED" and run["name"] == "embed watched -> a"
    artifacts = _artifacts(prefect_server, run_id)
    assert {"embed-summary", "embed-eigenvalues", "embed-counting", "embed-rejected-shards"} <= set(artifacts)
    table = {row["quantity"]: row["value"] for row in json.loads(artifacts["embed-summary"]["data"])}
    assert table["store version"] == "v0001"
    assert table["examples (corpus)"] == summary["n_examples"]
    assert table["labels (vocabulary)"] == summary["n_labels"]
    assert len(json.loads(artifacts["embed-eigenvalues"]["data"])) == summary["dim"]
    assert artifacts["embed-counting"]["data"] == 100
    names = sorted(t["name"] for t in _task_runs(prefect_server, run_id))
    counted = [f"count part-0000{i}.parquet" for i in range(3)]
    assert [n for n in names if n.startswith("count ")] == ["count bad.parquet", *counted]


def test_incremental_equals_full(incremental) -> None:
    from pmi_pipeline.store import EmbeddingStore

    assert incremental["second"].is_completed() and incremental["full"].is_completed()
    a, b = EmbeddingStore(incremental["root"] / "a"), EmbeddingStore(incremental["root"] / "b")
    assert a.versions() == ["v0001", "v0002"] and b.versions() == ["v0001"]
    counts_a, counts_b = a.read_counts(), b.read_counts()
    assert counts_a.n_examples == counts_b.n_examples == 19577
    assert counts_a.equals(counts_b)
    assert set(counts_a.manifest) == set(counts_b.manifest)


def test_counting_tasks_are_cached_by_shard_content(prefect_server: PrefectServer, incremental) -> None:
    # The full embedding counted shards that the incremental runs had counted already (same content, other
    # paths): all four come from the cache.
    counts = [
        t for t in _task_runs(prefect_server, _flow_run_id(incremental["full"])) if t["name"].startswith("count ")
    ]
    assert len(counts) == 4
    assert {t["state_name"] for t in counts} == {"Cached"}
    # The re-embedding counted only the new shard (and met the bad one again: it is never in the manifest).
    reembed_counts = [
        t for t in _task_runs(prefect_server, _flow_run_id(incremental["second"])) if t["name"].startswith("count ")
    ]
    assert sorted(t["name"] for t in reembed_counts) == ["count bad.parquet", "count part-00003.parquet"]


def test_reembedding_is_aligned_and_places_new_labels(prefect_server: PrefectServer, incremental) -> None:
    state = incremental["second"]
    summary = state.result()
    assert summary["version"] == "v0002" and summary["parent"] == "v0001" and summary["n_new_shards"] == 1
    alignment = summary["alignment"]
    assert alignment["n_new_labels"] > 0 and alignment["n_shared"] > 1000
    assert alignment["mean_cosine"] > 0.7 > alignment["mean_cosine_unaligned"]
    assert summary["zero_shot"] and all(row["nearest"] for row in summary["zero_shot"])
    artifacts = _artifacts(prefect_server, _flow_run_id(state))
    assert {"embed-summary", "reembed-alignment", "reembed-zero-shot"} <= set(artifacts)
    rows = {r["quantity"]: r["value"] for r in json.loads(artifacts["reembed-alignment"]["data"])}
    assert rows["parent"] == "v0001" and rows["mean cosine"] == pytest.approx(alignment["mean_cosine"])


def test_a_shard_is_hashed_once_when_listed_and_checked_when_counted(bibtex_dir, tmp_path) -> None:
    """The count task's cache key is the hash the shard was listed with (no second read of the file), and the task
    counts the shard only if its bytes still have that hash; otherwise the shard is reported, not counted."""
    from prefect.logging import disable_run_logger

    from flows.embed import _shard_cache_key, count_shard_task
    from pmi_pipeline.shards import shard_hash

    shard = next((bibtex_dir / "annotations" / "train").glob("*.parquet"))
    digest = shard_hash(shard)
    missing = tmp_path / "gone.parquet"  # never read: the key comes from the listed hash
    key = _shard_cache_key(None, {"shard": str(missing), "cache_dir": str(tmp_path), "digest": digest})
    assert digest.removeprefix("sha256:") in key
    assert key == _shard_cache_key(None, {"shard": str(shard), "cache_dir": str(tmp_path)})

    with disable_run_logger():  # the task's own function, outside a flow run
        counted = count_shard_task.fn(str(shard), str(tmp_path), digest)
        stale = count_shard_task.fn(str(shard), str(tmp_path), "sha256:" + "0" * 64)
    assert counted["error"] is None and counted["hash"] == digest
    assert stale["counts"] is None and "changed after it was listed" in stale["error"]


def test_input_errors_are_not_retried() -> None:
    from prefect.states import Failed

    from flows import retry_unless_input_error
    from pmi_pipeline.errors import ShardError

    assert not retry_unless_input_error(None, None, Failed(data=ShardError("x.parquet", "bad", column="tags")))
    assert retry_unless_input_error(None, None, Failed(data=OSError("stale NFS handle")))


def test_reembed_cli_on_a_given_dask_cluster_with_nothing_new(incremental, capsys: pytest.CaptureFixture[str]) -> None:
    from distributed import LocalCluster

    from pmi_pipeline.cli import main

    store = incremental["root"] / "a"
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster:
        argv = ["reembed", str(incremental["watched"]), "--store", str(store), "--dask", cluster.scheduler_address]
        assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] is None and summary["n_new_shards"] == 0 and summary["n_shards"] == 5


def test_demo_pipeline_then_reembed_with_reevaluation(
    prefect_server: PrefectServer, bibtex_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pmi-pipeline demo` against the server: embed -> train both heads -> evaluate; then a re-embedding
    (new parameters, same shards) re-evaluates the cosine model with the new, aligned version."""
    from flows.reembed import reembed_flow
    from pmi_pipeline.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--data", str(bibtex_dir), "--out", str(out), "--epochs", "1", "--dim", "16", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["runs"]) == {"cosine", "bce"}
    for head, run in summary["runs"].items():
        assert (Path(run["run_dir"]) / "checkpoint.pt").is_file(), head
        assert run["metrics"]["P@1"] > 10
    keys = [
        "pipeline-summary",
        "pipeline-curves",
        "train-metrics-cosine",
        "train-metrics-bce",
        "train-curve-cosine",
        "train-curve-plot-bce",
        "train-progress-cosine",
        "evaluate-metrics-bce",
    ]
    found = api_post(prefect_server, "/artifacts/filter", {"artifacts": {"key": {"any_": keys}}})
    assert set(keys) <= {a["key"] for a in found}
    progress = [a for a in found if a["key"] == "train-progress-cosine"]
    assert progress[-1]["data"] == 100
    runs = api_post(prefect_server, "/flow_runs/filter", {"flows": {"name": {"any_": ["pipeline"]}}})
    assert any(r["name"] == "pipeline bibtex" and r["state_type"] == "COMPLETED" for r in runs)

    cosine_run = summary["runs"]["cosine"]["run_dir"]
    state = reembed_flow(
        shards=[str(bibtex_dir)],
        store=summary["store"],
        params={**PARAMS, "power": 0.0},
        evaluate_run=cosine_run,
        return_state=True,
    )
    assert state.is_completed(), state.message
    result = state.result()
    assert result["version"] == "v0002" and result["n_new_shards"] == 0
    evaluation = result["evaluation"]
    assert evaluation["as_trained"]["P@1"] == pytest.approx(summary["runs"]["cosine"]["metrics"]["P@1"])
    assert evaluation["with_new_version"]["P@1"] > 10
    assert "reembed-evaluation" in _artifacts(prefect_server, _flow_run_id(state))
