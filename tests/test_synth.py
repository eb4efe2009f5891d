"""Tests for the synthetic corpus generator and the ``pmi-pipeline synth`` command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmi_pipeline.errors import PipelineError
from pmi_pipeline.synth import (
    CORPUS_FILE,
    LABELS_FILE,
    SynthConfig,
    generate_batch,
    label_model,
    read_corpus_info,
    write_corpus,
)

SMALL = SynthConfig(n_examples=6_000, n_labels=600, mean_labels=4.0, n_groups=30, shard_size=2_000, seed=7)


def _read_all(paths: list[Path]) -> tuple[np.ndarray, list[list[str]]]:
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    return table.column("example_id").to_numpy(), table.column("labels").to_pylist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "corpus"
    summary = write_corpus(out, SMALL, progress=False)
    ids, labels = _read_all(summary.paths)
    return summary, ids, labels


def test_layout_and_schema(corpus):
    summary, _, labels = corpus
    assert [p.name for p in summary.paths] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    for path in summary.paths:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.field("example_id").type == pa.int64()
        assert pf.schema_arrow.field("labels").type == pa.list_(pa.string())
        assert pf.metadata.num_rows == SMALL.shard_size
        assert pf.metadata.row_group(0).column(1).compression == "ZSTD"
    assert (summary.out_dir / CORPUS_FILE).is_file() and (summary.out_dir / LABELS_FILE).is_file()
    assert not list(summary.out_dir.glob(".*"))  # no temporary files left behind
    # Labels look like L000123, every example has at least one, and an example's labels are distinct and
    # sorted.
    assert all(len(row) >= 1 and len(set(row)) == len(row) and row == sorted(row) for row in labels)
    names = {name for row in labels for name in row}
    assert all(len(n) == 7 and n[0] == "L" and n[1:].isdigit() and int(n[1:]) < SMALL.n_labels for n in names)


def test_example_ids_unique_across_shards(corpus):
    _, ids, _ = corpus
    assert ids.dtype == np.int64
    assert np.unique(ids).size == ids.size == SMALL.n_examples


def test_totals_and_labels_per_example(corpus):
    summary, _, labels = corpus
    sizes = np.array([len(row) for row in labels])
    assert summary.n_examples == SMALL.n_examples
    assert summary.n_annotations == sizes.sum()
    assert abs(sizes.mean() - SMALL.mean_labels) < 0.1
    # 1 + Poisson(mean - 1): the variance is mean - 1, not that of a constant.
    assert 0.7 * (SMALL.mean_labels - 1) < sizes.var() < 1.3 * (SMALL.mean_labels - 1)
    counts = Counter(name for row in labels for name in row)
    observed = np.zeros(SMALL.n_labels, dtype=np.int64)
    for name, c in counts.items():
        observed[int(name[1:])] = c
    np.testing.assert_array_equal(observed, summary.label_counts)


def test_n_annotations_target(tmp_path):
    config = SynthConfig(n_annotations=40_000, n_labels=300, mean_labels=5.0, shard_size=3_000, seed=1)
    summary = write_corpus(tmp_path / "c", config, progress=False)
    assert summary.n_examples == 8_000
    assert abs(summary.n_annotations / 40_000 - 1) < 0.02
    assert abs(summary.mean_labels - 5.0) < 0.1


def test_frequencies_heavy_tailed(corpus, tmp_path):
    summary, _, _ = corpus
    # Zipf(1) over 600 labels: the top 1% (6 labels) hold far more than 1% of the annotations.
    assert summary.top_share(0.01) > 0.12
    assert summary.top_share(0.10) > 0.4
    # Without groups and with a flat distribution there is no tail: a control for the statistic.
    flat = SynthConfig(n_examples=6_000, n_labels=600, mean_labels=4.0, n_groups=0, zipf_exponent=0.0, seed=7)
    assert write_corpus(tmp_path / "flat", flat, progress=False).top_share(0.01) < 0.03


def test_group_structure(corpus):
    _, _, labels = corpus
    group_of = label_model(SMALL).group_of
    within = across = 0
    for row in labels:
        g = group_of[[int(name[1:]) for name in row]]
        same = int((g[:, None] == g[None, :]).sum() - len(g)) // 2
        within += same
        across += len(g) * (len(g) - 1) // 2 - same
    # Per possible pair: 30 groups of 20 labels have 30 * 190 within-group pairs among 600 * 599 / 2.
    n_within = SMALL.total_groups * 20 * 19 // 2
    n_across = SMALL.n_labels * (SMALL.n_labels - 1) // 2 - n_within
    assert (within / n_within) > 20 * (across / n_across)


def test_deterministic(tmp_path, corpus):
    summary, _, _ = corpus
    again = write_corpus(tmp_path / "again", SMALL, progress=False)
    for a, b in zip(summary.paths, again.paths, strict=True):
        assert a.read_bytes() == b.read_bytes()
    other = write_corpus(tmp_path / "other", SynthConfig(**{**SMALL.to_dict(), "seed": 8}), progress=False)
    assert other.paths[0].read_bytes() != summary.paths[0].read_bytes()


@pytest.mark.slow  # spawns two interpreters that import numpy and pyarrow
def test_same_bytes_with_worker_processes(tmp_path, corpus):
    summary, _, _ = corpus
    parallel = write_corpus(tmp_path / "par", SMALL, progress=False, workers=2)
    for a, b in zip(summary.paths, parallel.paths, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_corpus_json(corpus):
    summary, _, _ = corpus
    info = read_corpus_info(summary.out_dir)
    assert SynthConfig.from_dict(info["config"]) == SMALL
    assert info["n_examples"] == SMALL.n_examples
    assert info["n_annotations"] == summary.n_annotations
    assert info["shards"] == [p.name for p in summary.paths]
    header, *rows = (summary.out_dir / LABELS_FILE).read_text().splitlines()
    assert header.split("\t") == ["label", "group", "frequency_rank", "probability", "count"]
    assert len(rows) == SMALL.n_labels
    assert sum(int(r.split("\t")[4]) for r in rows) == summary.n_annotations


def test_refuses_to_overwrite(tmp_path):
    config = SynthConfig(n_examples=100, n_labels=50, seed=0)
    write_corpus(tmp_path / "c", config, progress=False)
    with pytest.raises(PipelineError, match="already holds a corpus"):
        write_corpus(tmp_path / "c", config, progress=False)
    assert write_corpus(tmp_path / "c", config, progress=False, overwrite=True).n_examples == 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_examples": 10, "n_annotations": 10},
        {},
        {"n_examples": 10, "mean_labels": 0.5},
        {"n_examples": 10, "n_labels": 10, "n_groups": 11},
        {"n_examples": 10, "group_share": 1.5},
        {"n_examples": 10, "shard_size": 0},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        SynthConfig(**kwargs)


def test_edge_cases():
    rng = np.random.default_rng(0)
    # Fewer labels than asked for per example: capped at the vocabulary, still distinct.
    tiny = SynthConfig(n_examples=50, n_labels=3, mean_labels=3.0, n_groups=1)
    sizes, flat = generate_batch(label_model(tiny), tiny, 50, rng)
    assert sizes.min() >= 1 and sizes.max() <= 3 and sizes.sum() == flat.size
    rows = np.repeat(np.arange(50), sizes)
    assert np.unique(rows * 3 + flat).size == flat.size
    # No groups at all: pure Zipf background.
    flat_cfg = SynthConfig(n_examples=200, n_labels=100, n_groups=0)
    sizes, flat = generate_batch(label_model(flat_cfg), flat_cfg, 200, rng)
    assert sizes.min() >= 1 and flat.max() < 100


def test_shards_pass_the_shard_reader(corpus):
    shards = pytest.importorskip("pmi_pipeline.shards")
    summary, _, _ = corpus
    assert shards.discover_shards([summary.out_dir]) == [p.resolve() for p in summary.paths]
    total = 0
    for path in summary.paths:
        ann = shards.read_annotations(path)
        assert ann.n_examples == SMALL.shard_size
        total += ann.n_annotations
    assert total == summary.n_annotations


def test_cli(tmp_path, capsys):
    from pmi_pipeline.cli import main

    out = tmp_path / "cli"
    argv = ["synth", str(out), "--examples", "1e3", "--labels", "200", "--groups", "10", "--seed", "3"]
    assert main([*argv, "--shard-size", "400", "--json", "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_examples"] == 1000 and info["n_shards"] == 3
    assert info["config"]["n_groups"] == 10 and info["config"]["seed"] == 3
    assert sorted(p.name for p in out.glob("*.parquet")) == info["shards"]

    assert main([*argv, "--no-progress"]) == 2  # already there
    assert "already holds a corpus" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--no-progress"]) == 0
    assert "1,000 examples" in capsys.readouterr().out

    assert main(["synth", str(tmp_path / "bad"), "--examples", "10", "--mean-labels", "0.5"]) == 2
    assert "mean_labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "bad"), "--annotations", "1.5"])
