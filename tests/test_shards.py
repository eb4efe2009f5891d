"""Shard reading and validation: real Parquet files written by the tests, every contract violation named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmi_pipeline.cooccurrence import count_shard
from pmi_pipeline.errors import ShardError
from pmi_pipeline.shards import discover_shards, read_annotations, shard_hash, write_annotation_shard


def write(path: Path, columns: dict, schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def test_list_and_long_forms_give_the_same_counts(tmp_path):
    lists = write(tmp_path / "list.parquet", {"example_id": [1, 2, 3], "labels": [["a", "b"], ["b", "c", "b"], ["a"]]})
    long = write(tmp_path / "long.parquet", {"example_id": [1, 1, 2, 2, 3, 2], "label": ["a", "b", "b", "c", "a", "b"]})
    a, b = count_shard(lists), count_shard(long)
    assert a.labels.tolist() == ["a", "b", "c"]
    assert a.label_counts.tolist() == [2, 2, 1]  # the repeated "b" of example 2 counts once
    assert a.pairs.toarray().tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert a.n_examples == b.n_examples == 3
    assert np.array_equal(a.label_counts, b.label_counts) and (a.pairs != b.pairs).nnz == 0


def test_confidence_zero_is_an_explicit_negative(tmp_path):
    path = write(
        tmp_path / "c.parquet",
        {
            "example_id": ["x", "x", "y", "z"],
            "label": ["a", "b", "a", "b"],
            "confidence": [1.0, 0.0, 0.7, 0.0],
        },
    )
    ann = read_annotations(path)
    assert ann.n_examples == 2  # z had only a negative
    assert ann.labels.tolist() == ["a"]
    assert ann.n_rows == 4 and ann.n_annotations == 2


@pytest.mark.parametrize(
    ("columns", "row", "column", "message"),
    [
        ({"id": [1], "labels": [["a"]]}, None, "id", "unexpected column"),
        ({"labels": [["a"]]}, None, "example_id", "missing column"),
        ({"example_id": [1]}, None, "labels", "exactly one of"),
        ({"example_id": [1], "label": ["a"], "labels": [["a"]]}, None, "label", "exactly one of"),
        ({"example_id": [1.5], "labels": [["a"]]}, None, "example_id", "string or int64"),
        ({"example_id": [1], "labels": [[1, 2]]}, None, "labels", "strings"),
        ({"example_id": [1], "label": [3]}, None, "label", "strings"),
        ({"example_id": [1, None], "labels": [["a"], ["b"]]}, 1, "example_id", "null example id"),
        ({"example_id": [1, 2], "labels": [["a"], None]}, 1, "labels", "null label list"),
        ({"example_id": [1, 2, 3], "labels": [["a"], ["b", None], ["c"]]}, 1, "labels", "null label"),
        ({"example_id": [1, 2], "labels": [["a"], []]}, 1, "labels", "empty label list"),
        ({"example_id": [1, 2, 3], "labels": [["a"], ["b"], ["c", ""]]}, 2, "labels", "empty label"),
        ({"example_id": [1, 2], "label": ["a", None]}, 1, "label", "null label"),
        ({"example_id": ["a", ""], "label": ["a", "b"]}, 1, "example_id", "empty example id"),
        ({"example_id": [1, 2], "label": ["a", "x" * 2000]}, 1, "label", "exceeds the limit"),
        (
            {"example_id": [1, 2], "label": ["a", "b"], "confidence": [1.0, float("nan")]},
            1,
            "confidence",
            "in [0, 1]",
        ),
        (
            {"example_id": [1, 2], "label": ["a", "b"], "confidence": [-0.5, 1.0]},
            0,
            "confidence",
            "in [0, 1]",
        ),
        ({"example_id": [1, 2], "label": ["a", "b"], "confidence": [1.0, 1.5]}, 1, "confidence", "in [0, 1]"),
        ({"example_id": [1, 2], "label": ["a", "b"], "confidence": ["1", "0"]}, None, "confidence", "float"),
    ],
)
def test_bad_shards_name_file_row_and_column(tmp_path, columns, row, column, message):
    path = write(tmp_path / "bad.parquet", columns)
    with pytest.raises(ShardError) as info:
        count_shard(path)
    error = info.value
    assert error.path == str(path) and error.row == row and error.column == column
    assert message in str(error) and str(path) in str(error)


def test_invalid_utf8_is_named(tmp_path):
    labels = pa.array([b"ok", b"bad\xff\xfe"], type=pa.binary()).cast(pa.string(), safe=False)
    path = write(tmp_path / "utf8.parquet", {"example_id": pa.array([1, 2]), "label": labels})
    with pytest.raises(ShardError, match="UTF-8") as info:
        read_annotations(path)
    assert (info.value.row, info.value.column) == (1, "label")


@pytest.mark.parametrize("content", [b"", b"example_id,labels\n1,a\n", b"PAR1garbage-not-parquetPAR1"])
def test_unreadable_files_are_rejected(tmp_path, content):
    path = tmp_path / "broken.parquet"
    path.write_bytes(content)
    with pytest.raises(ShardError, match="not a readable Parquet file") as info:
        read_annotations(path)
    assert info.value.path == str(path)


def test_truncated_parquet_is_rejected(tmp_path):
    good = write_annotation_shard(tmp_path / "good.parquet", np.arange(100), [["a", "b"]] * 100)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="not a readable Parquet file"):
        read_annotations(truncated)


def test_hash_is_content_identity(tmp_path):
    a = write_annotation_shard(tmp_path / "a.parquet", [1, 2], [["x"], ["y"]])
    b = tmp_path / "copy-with-another-name.parquet"
    b.write_bytes(a.read_bytes())
    c = write_annotation_shard(tmp_path / "c.parquet", [1, 2], [["x"], ["z"]])
    assert shard_hash(a) == shard_hash(b) != shard_hash(c)
    assert shard_hash(a).startswith("sha256:")


def test_discover_shards(tmp_path, bibtex_dir):
    for name in ("x/1.parquet", "x/y/2.parquet", "3.parquet"):
        write_annotation_shard(tmp_path / name, [1], [["a"]])
    (tmp_path / "x" / "notes.txt").write_text("not a shard")
    assert [p.name for p in discover_shards([tmp_path / "x"])] == ["1.parquet", "2.parquet"]
    assert [p.name for p in discover_shards([str(tmp_path / "*.parquet"), tmp_path / "3.parquet"])] == ["3.parquet"]
    # an import directory contributes its training annotations only: test labels must not leak
    found = discover_shards([bibtex_dir])
    assert found and all("annotations/train" in str(p) for p in found)
    # also when a glob matches the import directory
    assert discover_shards([str(bibtex_dir.parent / "bib*")]) == found
    with pytest.raises(ShardError, match="no such file"):
        discover_shards([tmp_path / "missing"])


@pytest.mark.parametrize(
    ("labels", "row", "message"),
    [
        ([["a"], [None]], 1, "null label in list"),  # a row group whose dictionary holds no value at all
        ([["a"], ["b", None]], 1, "null label in list"),
    ],
)
def test_null_labels_are_named_whatever_the_dictionary_holds(tmp_path, labels, row, message):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"example_id": list(range(len(labels))), "labels": labels}), path, row_group_size=1)
    with pytest.raises(ShardError, match=message) as info:
        read_annotations(path)
    assert (info.value.row, info.value.column) == (row, "labels")
