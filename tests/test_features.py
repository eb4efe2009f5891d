"""Feature shards: round trips in both forms, validation of bad shards, and the split loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from pmi_pipeline.errors import PipelineError, ShardError
from pmi_pipeline.features import (
    N_FEATURES_KEY,
    load_split,
    read_feature_shards,
    read_label_names,
    write_feature_shard,
)

# --- round trips --------------------------------------------------------------------------------------------


def _random_csr(rng: np.random.Generator, n: int, d: int, density: float) -> sp.csr_matrix:
    X = sp.random(n, d, density=density, format="csr", dtype=np.float64, random_state=rng)
    X.data = (X.data * 10 - 5).astype(np.float64)
    X = sp.diags((np.arange(n) > 0).astype(np.float64)) @ X  # an empty first row
    X.eliminate_zeros()
    return sp.csr_matrix(X)


def test_sparse_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = _random_csr(rng, 50, 30, 0.2)
    ids = rng.permutation(1000)[:50]
    path = write_feature_shard(tmp_path / "f.parquet", ids, X)

    schema = pq.read_schema(path)
    assert schema.field("example_id").type == pa.int64()
    assert schema.field("feature_index").type == pa.list_(pa.int32())
    assert schema.field("feature_value").type == pa.list_(pa.float32())
    assert schema.metadata[N_FEATURES_KEY] == b"30"

    got_ids, got = read_feature_shards([path])
    assert isinstance(got, sp.csr_matrix)
    assert got.dtype == np.float32
    assert got.has_canonical_format
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got.toarray(), X.toarray().astype(np.float32))


def test_dense_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(7, 5))
    path = write_feature_shard(tmp_path / "d.parquet", np.arange(7), X)
    assert pa.types.is_fixed_size_list(pq.read_schema(path).field("features").type)
    ids, got = read_feature_shards([path])
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(ids, np.arange(7))
    np.testing.assert_array_equal(got, X.astype(np.float32))


def test_sparse_duplicates_are_summed_and_wider_dimension_kept(tmp_path: Path) -> None:
    # COO with a repeated entry: a CSR built from it keeps both until summed
    X = sp.csr_matrix((np.array([1.0, 2.0, 3.0]), (np.array([0, 0, 1]), np.array([2, 2, 0]))), shape=(2, 3))
    path = write_feature_shard(tmp_path / "f.parquet", [10, 11], X, n_features=8)
    _, got = read_feature_shards([path])
    assert got.shape == (2, 8)
    np.testing.assert_array_equal(got.toarray()[:, :3], [[0, 0, 3], [3, 0, 0]])


def test_several_shards_concatenate_in_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    parts = [_random_csr(rng, n, 12, 0.3) for n in (5, 1, 9)]
    paths, start = [], 0
    for k, X in enumerate(parts):
        paths.append(write_feature_shard(tmp_path / f"part-{k}.parquet", np.arange(start, start + X.shape[0]), X))
        start += X.shape[0]
    ids, got = read_feature_shards(paths)
    np.testing.assert_array_equal(ids, np.arange(15))
    np.testing.assert_array_equal(got.toarray(), sp.vstack(parts).toarray().astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 6),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    dense=st.booleans(),
)
def test_round_trip_property(tmp_path_factory: pytest.TempPathFactory, n: int, d: int, seed: int, dense: bool):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d)) * (rng.random((n, d)) < 0.4)
    X = A if dense else sp.csr_matrix(A)
    path = write_feature_shard(tmp_path_factory.mktemp("p") / "f.parquet", np.arange(n) * 3, X)
    ids, got = read_feature_shards([path])
    np.testing.assert_array_equal(ids, np.arange(n) * 3)
    got_dense = got if dense else got.toarray()
    np.testing.assert_array_equal(got_dense, A.astype(np.float32))


def test_writer_rejects_inconsistent_input(tmp_path: Path) -> None:
    X = sp.csr_matrix(np.eye(3))
    with pytest.raises(ValueError, match="unique"):
        write_feature_shard(tmp_path / "f.parquet", [1, 1, 2], X)
    with pytest.raises(ValueError, match="rows"):
        write_feature_shard(tmp_path / "f.parquet", [1, 2], X)
    with pytest.raises(ValueError, match="n_features"):
        write_feature_shard(tmp_path / "f.parquet", [1, 2, 3], X, n_features=2)
    with pytest.raises(ValueError, match="n_features"):
        write_feature_shard(tmp_path / "f.parquet", [1, 2, 3], np.eye(3), n_features=4)
    assert not list(tmp_path.iterdir())  # nothing half-written


# --- bad shards ---------------------------------------------------------------------------------------------


def _write_raw(path: Path, columns: dict[str, pa.Array], n_features: int | None = 4) -> Path:
    table = pa.table(columns)
    if n_features is not None:
        table = table.replace_schema_metadata({N_FEATURES_KEY: str(n_features).encode()})
    pq.write_table(table, path)
    return path


def _sparse_cols(ids, index, value) -> dict[str, pa.Array]:
    return {
        "example_id": pa.array(ids, pa.int64()),
        "feature_index": pa.array(index, pa.list_(pa.int32())),
        "feature_value": pa.array(value, pa.list_(pa.float32())),
    }


@pytest.mark.parametrize(
    ("index", "value", "n_features", "row", "column", "match"),
    [
        ([[0], [1, 4]], [[1.0], [1.0, 2.0]], 4, 1, "feature_index", "outside"),
        ([[0], [-1]], [[1.0], [1.0]], 4, 1, "feature_index", "outside"),
        ([[0, 1], [2]], [[1.0], [1.0]], 4, 0, "feature_value", "differ in length"),
        ([[0], [2, 3]], [[1.0], [1.0, float("nan")]], 4, 1, "feature_value", "non-finite"),
        ([[0], [3, 1, 3]], [[1.0], [1.0, 1.0, 1.0]], 4, 1, "feature_index", "repeated"),
        ([[0], None], [[1.0], None], 4, 1, "feature_index", "null"),
    ],
)
def test_bad_sparse_shard(tmp_path: Path, index, value, n_features, row, column, match) -> None:
    path = _write_raw(tmp_path / "bad.parquet", _sparse_cols([0, 1], index, value), n_features)
    with pytest.raises(ShardError, match=match) as info:
        read_feature_shards([path])
    assert info.value.path == str(path)
    assert info.value.row == row
    assert info.value.column == column


def test_missing_or_bad_metadata(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "a.parquet", _sparse_cols([0], [[0]], [[1.0]]), None)
    with pytest.raises(ShardError, match="n_features"):
        read_feature_shards([path])
    table = pa.table(_sparse_cols([0], [[0]], [[1.0]])).replace_schema_metadata({N_FEATURES_KEY: b"four"})
    pq.write_table(table, tmp_path / "b.parquet")
    with pytest.raises(ShardError, match="not an integer"):
        read_feature_shards([tmp_path / "b.parquet"])


def test_wrong_types_and_columns(tmp_path: Path) -> None:
    cols = _sparse_cols([0], [[0]], [[1.0]])
    cols["example_id"] = pa.array(["a"])
    with pytest.raises(ShardError, match="int64") as info:
        read_feature_shards([_write_raw(tmp_path / "a.parquet", cols)])
    assert info.value.column == "example_id"
    cols = _sparse_cols([0], [[0]], [[1.0]])
    cols["feature_value"] = pa.array([["x"]], pa.list_(pa.string()))
    with pytest.raises(ShardError, match="type") as info:
        read_feature_shards([_write_raw(tmp_path / "b.parquet", cols)])
    assert info.value.column == "feature_value"
    with pytest.raises(ShardError, match="no feature columns"):
        read_feature_shards([_write_raw(tmp_path / "c.parquet", {"example_id": pa.array([0], pa.int64())})])
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(ShardError, match="Parquet"):
        read_feature_shards([tmp_path / "d.parquet"])


def test_dense_list_size_must_match_metadata(tmp_path: Path) -> None:
    values = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(6, np.float32)), 3)
    path = _write_raw(tmp_path / "a.parquet", {"example_id": pa.array([0, 1], pa.int64()), "features": values}, 4)
    with pytest.raises(ShardError, match="list size 3"):
        read_feature_shards([path])


def test_shards_must_agree(tmp_path: Path) -> None:
    a = write_feature_shard(tmp_path / "a.parquet", [0, 1], sp.csr_matrix(np.eye(2)))
    b = write_feature_shard(tmp_path / "b.parquet", [2], np.ones((1, 2)))
    c = write_feature_shard(tmp_path / "c.parquet", [2], sp.csr_matrix(np.ones((1, 3))))
    d = write_feature_shard(tmp_path / "d.parquet", [5, 1], sp.csr_matrix(np.eye(2)))
    with pytest.raises(ShardError, match="dense features") as info:
        read_feature_shards([a, b])
    assert info.value.path == str(b)
    with pytest.raises(ShardError, match="n_features=3"):
        read_feature_shards([a, c])
    with pytest.raises(ShardError, match="example_id 1 also appears") as info:
        read_feature_shards([a, d])
    assert (info.value.row, info.value.column) == (1, "example_id")
    with pytest.raises(PipelineError):
        read_feature_shards([])


# --- import directories -------------------------------------------------------------------------------------


def _tiny_import_dir(root: Path) -> Path:
    X = sp.csr_matrix(np.array([[1.0, 0, 0], [0, 2, 0], [0, 0, 3], [4, 0, 0]]))
    write_feature_shard(root / "features" / "train" / "part-00000.parquet", [10, 11, 12, 13], X)
    (root / "annotations" / "train").mkdir(parents=True)
    pq.write_table(
        pa.table({"example_id": pa.array([12, 10], pa.int64()), "labels": [["b", "a", "b"], ["c"]]}),
        root / "annotations" / "train" / "part-00000.parquet",
    )
    # a long-form shard, with an explicit negative and an example that has no features
    pq.write_table(
        pa.table(
            {
                "example_id": pa.array([13, 13, 99], pa.int64()),
                "label": ["a", "c", "a"],
                "confidence": pa.array([1.0, 0.0, 1.0]),
            }
        ),
        root / "annotations" / "train" / "part-00001.parquet",
    )
    (root / "labels.txt").write_text("a\nb\nc\n", encoding="utf-8")
    return root


def test_load_split_joins_labels_by_id(tmp_path: Path) -> None:
    split = load_split(_tiny_import_dir(tmp_path), "train")
    np.testing.assert_array_equal(split.example_ids, [10, 11, 12, 13])
    assert split.labels == [["c"], [], ["b", "a"], ["a"]]
    assert split.n_features == 3
    assert split.X.dtype == np.float32
    assert len(split) == 4
    names = read_label_names(tmp_path)
    assert names == ["a", "b", "c"]
    Y = split.label_matrix(names)
    np.testing.assert_array_equal(Y.toarray(), [[0, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]])
    with pytest.raises(PipelineError, match="'c'"):
        split.label_matrix(["a", "b"])
    np.testing.assert_array_equal(split.label_matrix(["b"], unknown="ignore").toarray().ravel(), [0, 0, 1, 0])


def test_load_split_rejects_an_example_annotated_twice(tmp_path: Path) -> None:
    root = _tiny_import_dir(tmp_path)
    pq.write_table(
        pa.table({"example_id": pa.array([11], pa.int64()), "labels": [["a"]]}),
        root / "annotations" / "train" / "part-00002.parquet",
    )
    pq.write_table(
        pa.table({"example_id": pa.array([11], pa.int64()), "labels": [["b"]]}),
        root / "annotations" / "train" / "part-00003.parquet",
    )
    with pytest.raises(ShardError, match="also annotated"):
        load_split(root, "train")


def test_load_split_missing(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no feature shards"):
        load_split(tmp_path, "train")
    with pytest.raises(PipelineError, match=r"labels\.txt"):
        read_label_names(tmp_path)


def test_label_names_keep_odd_characters(tmp_path: Path) -> None:
    names = ["TAG_m\\'usica", "TAG_dise\\~no", "a b", "ü", "x,y"]
    (tmp_path / "labels.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    assert read_label_names(tmp_path) == names


def test_load_split_on_sample_data(bibtex_dir: Path) -> None:
    info = json.loads((bibtex_dir / "dataset.json").read_text())
    test = load_split(bibtex_dir, "test")
    assert test.X.shape == (2515, 1836)
    assert test.n_features == info["n_features"]
    # ids continue after the training rows
    np.testing.assert_array_equal(test.example_ids, np.arange(4880, 4880 + 2515))
    assert sum(map(len, test.labels)) == info["splits"]["test"]["n_annotations"]
    np.testing.assert_array_equal(np.unique(test.X.data), [1.0])  # binary features
