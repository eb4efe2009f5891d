"""Feature shards: the training input that pairs with the annotation shards.

A feature shard is a Parquet file with an ``example_id`` column (int64) and the features of each example in
one of two forms, chosen by the writer:

- sparse: ``feature_index`` (list<int32>) and ``feature_value`` (list<float32>), one list pair per example;
- dense: ``features`` (fixed-size list<float32>), one vector per example.

The feature dimension is stored in the file's key-value metadata under ``n_features``, because a sparse
shard cannot reveal it (its largest column may be empty) and every shard of a dataset must agree on it.

    >>> write_feature_shard("part-00000.parquet", ids, X)          # X: csr_matrix -> sparse, ndarray -> dense
    >>> ids, X = read_feature_shards(["part-00000.parquet"])       # validated, float32
    >>> train = load_split("data/bibtex", "train")                 # features joined to their label lists

:func:`load_split` reads an *import directory* (see ``docs/architecture.md``):
``features/<split>/*.parquet`` joined by ``example_id`` to ``annotations/<split>/*.parquet``; an example
with features but no annotation row has no labels.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from pmi_pipeline.errors import PipelineError, ShardError

__all__ = [
    "N_FEATURES_KEY",
    "Split",
    "load_split",
    "read_feature_shards",
    "read_label_names",
    "write_feature_shard",
]

logger = logging.getLogger(__name__)

#: Key of the feature dimension in a feature shard's Parquet key-value metadata.
N_FEATURES_KEY = b"n_features"

_SPARSE_COLUMNS = ("feature_index", "feature_value")
_DENSE_COLUMN = "features"


# ----------------------------------------------------------------------------------------------------------
# writing


def write_feature_shard(
    path: str | Path,
    example_ids: Sequence[int] | np.ndarray,
    X: sp.spmatrix | sp.sparray | np.ndarray,
    n_features: int | None = None,
    *,
    compression: str = "zstd",
) -> Path:
    """Write one feature shard and return its path.

    A scipy sparse matrix is written in the sparse form (its indices sorted and duplicates summed, so that
    readers get canonical CSR), a 2-D ndarray in the dense form. ``n_features`` defaults to ``X.shape[1]``;
    for sparse input it may be larger (a shard holding a subset of the examples need not touch the last
    columns), never smaller than the largest index used. Values are stored as float32.

    The file is written under a temporary name and renamed into place, so a reader never sees half a shard.
    """
    path = Path(path)
    ids = np.asarray(example_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError("example_ids must be a 1-D sequence of integers")
    ids = ids.astype(np.int64, copy=False)
    if np.unique(ids).size != ids.size:
        raise ValueError("example_ids must be unique within a shard")

    if sp.issparse(X):
        table, dim = _sparse_table(ids, X, n_features)
    else:
        table, dim = _dense_table(ids, np.asarray(X), n_features)
    table = table.replace_schema_metadata({N_FEATURES_KEY: str(dim).encode()})

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp, compression=compression)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _sparse_table(ids: np.ndarray, X: sp.spmatrix | sp.sparray, n_features: int | None) -> tuple[pa.Table, int]:
    csr = sp.csr_matrix(X, dtype=np.float32, copy=True)
    csr.sum_duplicates()  # also sorts the indices
    if csr.shape[0] != ids.size:
        raise ValueError(f"X has {csr.shape[0]} rows but {ids.size} example ids were given")
    dim = csr.shape[1] if n_features is None else int(n_features)
    used = int(csr.indices.max()) + 1 if csr.nnz else 0
    if dim < used:
        raise ValueError(f"n_features={dim} but X uses feature index {used - 1}")
    if dim > np.iinfo(np.int32).max:
        raise ValueError("feature_index is int32: n_features must be below 2**31")
    offsets = pa.array(csr.indptr.astype(np.int32), pa.int32())
    index = pa.ListArray.from_arrays(offsets, pa.array(csr.indices.astype(np.int32), pa.int32()))
    value = pa.ListArray.from_arrays(offsets, pa.array(csr.data, pa.float32()))
    table = pa.table({"example_id": pa.array(ids, pa.int64()), "feature_index": index, "feature_value": value})
    return table, dim


def _dense_table(ids: np.ndarray, X: np.ndarray, n_features: int | None) -> tuple[pa.Table, int]:
    if X.ndim != 2:
        raise ValueError(f"dense X must be 2-D, got shape {X.shape}")
    if X.shape[0] != ids.size:
        raise ValueError(f"X has {X.shape[0]} rows but {ids.size} example ids were given")
    dim = X.shape[1]
    if n_features is not None and int(n_features) != dim:
        raise ValueError(f"n_features={n_features} but dense X has {dim} columns")
    values = pa.array(np.ascontiguousarray(X, dtype=np.float32).reshape(-1), pa.float32())
    features = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.table({"example_id": pa.array(ids, pa.int64()), _DENSE_COLUMN: features}), dim


# ----------------------------------------------------------------------------------------------------------
# reading


def read_feature_shards(
    paths: Iterable[str | Path],
) -> tuple[np.ndarray, sp.csr_matrix | np.ndarray]:
    """Read and validate feature shards; return ``(example_ids, X)`` with rows in file order.

    ``X`` is a float32 ``csr_matrix`` (canonical: sorted indices, no duplicates) when the shards are sparse,
    a float32 ndarray when they are dense. All shards must have the same form and the same ``n_features``,
    and an example id may appear only once across them: training joins features to labels by id, so a
    repeated id would silently double an example.

    Raises :class:`ShardError` naming the file, the (0-based) row and the column for: a missing or
    unreadable ``n_features``, a missing or mistyped column, null entries, index and value lists of
    different lengths, feature indices outside ``[0, n_features)`` or repeated within a row, non-finite
    values, repeated example ids.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise PipelineError("no feature shards given")
    ids_parts: list[np.ndarray] = []
    x_parts: list[sp.csr_matrix | np.ndarray] = []
    form: str | None = None
    dim: int | None = None
    seen_in: dict[int, Path] = {}
    for path in paths:
        ids, X, shard_form, shard_dim = _read_one(path)
        if form is None:
            form, dim = shard_form, shard_dim
        elif shard_form != form:
            raise ShardError(path, f"{shard_form} features, but {paths[0]} has {form} features")
        elif shard_dim != dim:
            raise ShardError(path, f"n_features={shard_dim}, but {paths[0]} has n_features={dim}")
        _check_unique_ids(path, ids, seen_in)
        ids_parts.append(ids)
        x_parts.append(X)
    example_ids = np.concatenate(ids_parts)
    if form == "sparse":
        X_all: sp.csr_matrix | np.ndarray = (
            x_parts[0] if len(x_parts) == 1 else sp.csr_matrix(sp.vstack(x_parts, format="csr"))
        )
    else:
        X_all = np.concatenate(x_parts, axis=0)
    return example_ids, X_all


def _check_unique_ids(path: Path, ids: np.ndarray, seen_in: dict[int, Path]) -> None:
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        k = int(np.flatnonzero(counts > 1)[0])
        rows = np.flatnonzero(ids == uniq[k])
        raise ShardError(
            path,
            f"example_id {uniq[k]} repeated (rows {rows[0]} and {rows[1]})",
            row=int(rows[1]),
            column="example_id",
        )
    if seen_in:
        for k in np.flatnonzero(np.isin(uniq, np.fromiter(seen_in, np.int64, len(seen_in)))):
            other = seen_in[int(uniq[k])]
            raise ShardError(
                path, f"example_id {uniq[k]} also appears in {other}", row=int(first[k]), column="example_id"
            )
    seen_in.update(dict.fromkeys(uniq.tolist(), path))


def _read_one(path: Path) -> tuple[np.ndarray, sp.csr_matrix | np.ndarray, str, int]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ShardError(path, f"not a readable Parquet file ({exc})") from exc
    dim = _n_features(path, table.schema.metadata)
    ids = _example_ids(path, table)
    names = set(table.column_names)
    if set(_SPARSE_COLUMNS) <= names:
        X: sp.csr_matrix | np.ndarray = _read_sparse(path, table, dim)
        form = "sparse"
    elif _DENSE_COLUMN in names:
        X = _read_dense(path, table, dim)
        form = "dense"
    else:
        raise ShardError(path, "no feature columns: expected feature_index + feature_value, or features")
    return ids, X, form, dim


def _n_features(path: Path, metadata: dict[bytes, bytes] | None) -> int:
    raw = (metadata or {}).get(N_FEATURES_KEY)
    if raw is None:
        raise ShardError(path, "no 'n_features' in the file's key-value metadata")
    try:
        dim = int(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShardError(path, f"'n_features' metadata {raw!r} is not an integer") from exc
    if dim < 0:
        raise ShardError(path, f"'n_features' metadata is negative ({dim})")
    return dim


def _example_ids(path: Path, table: pa.Table) -> np.ndarray:
    if "example_id" not in table.column_names:
        raise ShardError(path, "missing column", column="example_id")
    col = table.column("example_id")
    if not pa.types.is_integer(col.type):
        raise ShardError(path, f"must be int64, found {col.type}", column="example_id")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ShardError(path, "null example_id", row=row, column="example_id")
    return col.to_numpy().astype(np.int64)


def _list_column(path: Path, table: pa.Table, name: str, value_check) -> tuple[np.ndarray, np.ndarray]:
    """Return (offsets from 0, flat values) of a list column, checking its type and that no entry is null."""
    arr = table.column(name).combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or not value_check(arr.type.value_type):
        raise ShardError(path, f"unexpected type {arr.type}", column=name)
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise ShardError(path, "null list", row=row, column=name)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])) if len(offsets) else arr.values
    if values.null_count:
        bad = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) + int(offsets[0])
        row = int(np.searchsorted(offsets, bad, side="right") - 1)
        raise ShardError(path, "null entry inside a list", row=row, column=name)
    return offsets - offsets[0], values.to_numpy(zero_copy_only=False)


def _read_sparse(path: Path, table: pa.Table, dim: int) -> sp.csr_matrix:
    offsets, index = _list_column(path, table, "feature_index", pa.types.is_integer)
    voffsets, value = _list_column(path, table, "feature_value", pa.types.is_floating)
    if not np.array_equal(offsets, voffsets):
        row = int(np.flatnonzero(offsets != voffsets)[0]) - 1
        raise ShardError(
            path, "feature_index and feature_value lists differ in length", row=row, column="feature_value"
        )
    n = table.num_rows

    def row_of(flat: int) -> int:
        return int(np.searchsorted(offsets, flat, side="right") - 1)

    bad = np.flatnonzero((index < 0) | (index >= dim))
    if bad.size:
        raise ShardError(
            path,
            f"feature index {index[bad[0]]} outside [0, {dim})",
            row=row_of(int(bad[0])),
            column="feature_index",
        )
    bad = np.flatnonzero(~np.isfinite(value))
    if bad.size:
        raise ShardError(
            path, f"non-finite feature value {value[bad[0]]}", row=row_of(int(bad[0])), column="feature_value"
        )
    # copy: Arrow buffers are read-only and scipy sorts in place
    X = sp.csr_matrix(
        (value.astype(np.float32, copy=True), index.astype(np.int32, copy=True), offsets.astype(np.int64)),
        shape=(n, dim),
    )
    if not X.has_sorted_indices:
        X.sort_indices()
    # a repeat is an index equal to its neighbour within the same row
    row = np.repeat(np.arange(n), np.diff(X.indptr))
    dup = np.flatnonzero((np.diff(X.indices) == 0) & (np.diff(row) == 0))
    if dup.size:
        raise ShardError(
            path, f"feature index {X.indices[dup[0]]} repeated", row=int(row[dup[0]]), column="feature_index"
        )
    return X


def _read_dense(path: Path, table: pa.Table, dim: int) -> np.ndarray:
    arr = table.column(_DENSE_COLUMN).combine_chunks()
    if not pa.types.is_fixed_size_list(arr.type) or not pa.types.is_floating(arr.type.value_type):
        raise ShardError(path, f"must be fixed-size list<float32>, found {arr.type}", column=_DENSE_COLUMN)
    if arr.type.list_size != dim:
        raise ShardError(path, f"list size {arr.type.list_size} != n_features {dim}", column=_DENSE_COLUMN)
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise ShardError(path, "null feature vector", row=row, column=_DENSE_COLUMN)
    flat = arr.flatten()
    if flat.null_count:
        bad = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
        raise ShardError(path, "null entry in a feature vector", row=bad // max(dim, 1), column=_DENSE_COLUMN)
    X = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=True).reshape(len(arr), dim)
    bad_rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
    if bad_rows.size:
        raise ShardError(path, "non-finite feature value", row=int(bad_rows[0]), column=_DENSE_COLUMN)
    return X


# ----------------------------------------------------------------------------------------------------------
# import directories


@dataclass
class Split:
    """One split of an import directory: features and label lists, aligned row by row on ``example_ids``."""

    example_ids: np.ndarray
    X: sp.csr_matrix | np.ndarray
    labels: list[list[str]]
    n_features: int

    def __len__(self) -> int:
        return int(self.example_ids.size)

    def label_matrix(
        self, label_names: Sequence[str], *, unknown: Literal["error", "ignore"] = "error"
    ) -> sp.csr_matrix:
        """The label lists as a binary float32 CSR matrix, one column per name of ``label_names``, in order.

        ``unknown="ignore"`` drops labels missing from ``label_names`` (an embedding built with a minimum
        count keeps fewer labels than the dataset has); the default raises, because a typo in a vocabulary
        should not pass.
        """
        col = {name: j for j, name in enumerate(label_names)}
        indptr = np.zeros(len(self.labels) + 1, dtype=np.int64)
        indices: list[int] = []
        for i, names in enumerate(self.labels):
            for name in names:
                j = col.get(name)
                if j is None:
                    if unknown == "error":
                        raise PipelineError(f"label {name!r} of example {self.example_ids[i]} is not in the vocabulary")
                    continue
                indices.append(j)
            indptr[i + 1] = len(indices)
        data = np.ones(len(indices), dtype=np.float32)
        Y = sp.csr_matrix((data, np.asarray(indices, dtype=np.int32), indptr), shape=(len(self.labels), len(col)))
        Y.sum_duplicates()
        Y.data[:] = 1.0
        return Y


def _split_files(data_dir: Path, kind: str, split: str) -> list[Path]:
    return sorted((data_dir / kind / split).glob("*.parquet"))


def load_split(data_dir: str | Path, split: str) -> Split:
    """Load one split of an import directory: its feature shards, joined by ``example_id`` to its annotations.

    The annotation shards may be in list form (``labels`` list<string>) or long form (``label`` string, one
    row per example-label pair, rows with ``confidence == 0`` being explicit negatives that are dropped).
    Labels of an example keep their first-seen order with repeats collapsed. Annotated examples that have no
    features are ignored (and logged): training can do nothing with them.
    """
    data_dir = Path(data_dir)
    feature_paths = _split_files(data_dir, "features", split)
    if not feature_paths:
        raise PipelineError(f"{data_dir}: no feature shards in features/{split}/")
    example_ids, X = read_feature_shards(feature_paths)
    labels_by_id = _read_label_lists(_split_files(data_dir, "annotations", split))
    labels = [labels_by_id.pop(i, []) for i in example_ids.tolist()]
    if labels_by_id:
        logger.info("%s/%s: %d annotated examples have no features", data_dir, split, len(labels_by_id))
    return Split(example_ids=example_ids, X=X, labels=labels, n_features=X.shape[1])


def _read_label_lists(paths: Sequence[Path]) -> dict[int, list[str]]:
    """Label lists by example id; an example annotated in two shards is an error (one shard per example)."""
    out: dict[int, list[str]] = {}
    origin: dict[int, Path] = {}
    for path in paths:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise ShardError(path, f"not a readable Parquet file ({exc})") from exc
        ids = _example_ids(path, table)
        if "labels" in table.column_names:
            per_row = table.column("labels").to_pylist()
            if any(v is None for v in per_row):
                row = next(i for i, v in enumerate(per_row) if v is None)
                raise ShardError(path, "null label list", row=row, column="labels")
        elif "label" in table.column_names:
            label = table.column("label").to_pylist()
            per_row = [[v] for v in label]
            if "confidence" in table.column_names:
                conf = table.column("confidence").to_numpy(zero_copy_only=False)
                per_row = [v if c != 0 else [] for v, c in zip(per_row, conf, strict=True)]
        else:
            raise ShardError(path, "no 'labels' (list form) or 'label' (long form) column")
        shard: dict[int, list[str]] = {}
        for i, lab in zip(ids.tolist(), per_row, strict=True):
            shard.setdefault(i, []).extend(lab)
        for i, lab in shard.items():
            if i in origin:
                raise ShardError(path, f"example_id {i} is also annotated in {origin[i]}", column="example_id")
            origin[i] = path
            out[i] = list(dict.fromkeys(v for v in lab if v is not None))
    return out


def read_label_names(data_dir: str | Path) -> list[str]:
    """The label names of an import directory (``labels.txt``: every label of the source, in source order)."""
    path = Path(data_dir) / "labels.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PipelineError(f"{path}: not found (is {data_dir} an import directory?)") from exc
    names = text.split("\n")
    if names and names[-1] == "":
        names.pop()
    return [name.removesuffix("\r") for name in names]
