"""Read and validate annotation shards: Parquet files of (example id, labels).

A shard comes in one of two forms: long (``label``, one row per example-label pair) or list (``labels``,
list<string>, one row per example). An optional ``confidence`` in [0, 1] marks explicit negatives with 0 (the
Open Images convention): those rows are dropped. An example's labels are a set, so repeats collapse.

Validation is all-or-nothing per shard: the first problem raises :class:`~pmi_pipeline.errors.ShardError`
naming the file, the row (0-based, in file order) and the column, and nothing of the shard is used. A shard is
identified by the SHA-256 of its bytes, so the same content under another name is recognised as already counted.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pmi_pipeline.errors import ShardError
from pmi_pipeline.example_ids import hash_example_ids

log = logging.getLogger(__name__)

ID_COLUMN = "example_id"
LONG_COLUMN = "label"
LIST_COLUMN = "labels"
CONFIDENCE_COLUMN = "confidence"
KNOWN_COLUMNS = frozenset({ID_COLUMN, LONG_COLUMN, LIST_COLUMN, CONFIDENCE_COLUMN})
#: Longest label accepted, in UTF-8 bytes: longer ones are almost surely a parsing accident upstream.
MAX_LABEL_BYTES = 1024
#: Directory of an import directory's training annotations (see docs/architecture.md).
IMPORT_TRAIN_SUBDIR = Path("annotations") / "train"


@dataclass(frozen=True)
class Annotations:
    """One validated shard as integer codes: ``(example_codes[i], label_codes[i])`` are distinct pairs, sorted.

    ``labels`` is the shard's own vocabulary, sorted, so that a shard's counts do not depend on any other shard.
    """

    path: Path
    sha256: str
    labels: pa.Array  # (m_local,) strings, sorted and distinct
    example_codes: np.ndarray  # (nnz,) int32 (int64 past 2^31 values), in [0, n_examples)
    label_codes: np.ndarray  # (nnz,) int32 (int64 past 2^31 values), in [0, m_local)
    n_examples: int
    n_rows: int  # rows in the file, before dropping negatives and repeats
    example_ids: np.ndarray  # (n_examples,) uint64 fingerprints of the example ids, sorted (see example_ids.py)

    @property
    def n_annotations(self) -> int:
        return int(self.example_codes.size)


@dataclass(frozen=True)
class ShardCodes:
    """One validated shard as (example, dictionary entry) codes, one per kept label value, before its labels are
    sorted and its repeated (example, label) pairs dropped: :func:`read_annotations` does that per shard, and
    counting a batch of shards does it once for the whole batch, sorting its labels once rather than once per
    shard. ``dictionary`` may repeat a label (each row group has its own) or hold labels no kept value uses."""

    path: Path
    sha256: str
    dictionary: pa.Array  # strings
    example_codes: np.ndarray  # (n_values,) int32 (int64 past 2^31 values), in [0, n_examples), in row order
    entry_codes: np.ndarray  # (n_values,) indices into ``dictionary``
    n_examples: int
    n_rows: int
    example_ids: np.ndarray  # (n_examples,) uint64 fingerprints of the example ids, sorted


def shard_hash(path: str | Path) -> str:
    """Content hash of a shard file (``sha256:<hex>``): the shard's identity in the store's manifest."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def discover_shards(specs: Iterable[str | Path]) -> list[Path]:
    """Expand shard specifications into a sorted, de-duplicated list of Parquet files.

    A spec is a Parquet file, a directory (searched recursively for ``*.parquet``), a glob, or a directory written
    by ``pmi-pipeline import``, of which only the training annotations are used so that test labels never leak
    into the embedding.
    """
    found: set[Path] = set()
    for spec in specs:
        spec_path = Path(spec)
        if spec_path.exists():
            matches = [spec_path]
        else:
            matches = [Path(m) for m in glob.glob(str(spec), recursive=True)]
            if not matches:
                raise ShardError(spec_path, "no such file, directory or glob match")
        for match in matches:
            if match.is_dir():
                found.update(_parquet_under(match))
            elif match.is_file():
                found.add(match)
    return sorted(p.resolve() for p in found)


def _parquet_under(directory: Path) -> list[Path]:
    """Parquet files below a directory; of an import directory, only its training annotations."""
    if (directory / "dataset.json").is_file() and (directory / IMPORT_TRAIN_SUBDIR).is_dir():
        directory = directory / IMPORT_TRAIN_SUBDIR
    return [p for p in directory.rglob("*.parquet") if p.is_file()]


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    """Index of the first true value of a boolean array (nulls count as false)."""
    values = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    hits = np.flatnonzero(values)
    return int(hits[0]) if hits.size else None


def _check_schema(path: Path, schema: pa.Schema) -> str:
    """Check column names and types; return which label column the shard uses."""
    names = schema.names
    extra = sorted(set(names) - KNOWN_COLUMNS)
    if extra:
        raise ShardError(
            path,
            f"unexpected column(s) {extra}; expected {ID_COLUMN!r}, {LONG_COLUMN!r} or "
            f"{LIST_COLUMN!r}, and optionally {CONFIDENCE_COLUMN!r}",
            column=extra[0],
        )
    if len(set(names)) != len(names):
        raise ShardError(path, "duplicate column names")
    if ID_COLUMN not in names:
        raise ShardError(path, "missing column", column=ID_COLUMN)
    has_long, has_list = LONG_COLUMN in names, LIST_COLUMN in names
    if has_long == has_list:
        raise ShardError(
            path,
            f"needs exactly one of the columns {LONG_COLUMN!r} (one row per label) or {LIST_COLUMN!r} (list of labels)",
            column=LONG_COLUMN if has_long else LIST_COLUMN,
        )
    id_type = schema.field(ID_COLUMN).type
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise ShardError(path, f"must be string or int64, found {id_type}", column=ID_COLUMN)
    label_column = LONG_COLUMN if has_long else LIST_COLUMN
    label_type = schema.field(label_column).type
    if has_list:
        if not (pa.types.is_list(label_type) or pa.types.is_large_list(label_type)):
            raise ShardError(path, f"must be list<string>, found {label_type}", column=label_column)
        label_type = label_type.value_type
    if pa.types.is_dictionary(label_type):
        label_type = label_type.value_type
    if not (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
        raise ShardError(path, f"labels must be strings, found {schema.field(label_column).type}", column=label_column)
    if CONFIDENCE_COLUMN in names:
        conf_type = schema.field(CONFIDENCE_COLUMN).type
        if not (pa.types.is_floating(conf_type) or pa.types.is_integer(conf_type)):
            raise ShardError(path, f"must be a float in [0, 1], found {conf_type}", column=CONFIDENCE_COLUMN)
    return label_column


def _check_utf8(
    path: Path, strings: pa.Array, column: str, first_row: Callable[[np.ndarray], int | None] | None = None
) -> None:
    """Parquet does not guarantee valid UTF-8 in string columns; find and name the first bad value.

    ``first_row`` maps a mask of bad values to the row to name (for a dictionary: the first row that uses one);
    by default a value's index is its row.
    """
    try:
        strings.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    binary = strings.cast(pa.large_binary()) if pa.types.is_large_string(strings.type) else strings.cast(pa.binary())
    bad = np.zeros(len(binary), bool)
    for i, value in enumerate(binary.to_pylist()):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError:
            bad[i] = True
    if not bad.any():
        return
    row = first_row(bad) if first_row is not None else int(np.argmax(bad))
    if row is not None:
        raise ShardError(path, "not valid UTF-8", row=row, column=column)


def read_annotations(
    path: str | Path, *, expected_sha256: str | None = None, max_label_bytes: int = MAX_LABEL_BYTES
) -> Annotations:
    """Read one shard, validate it against the contract and encode it as integer pairs over its own sorted
    vocabulary (:func:`read_shard_codes`, then the labels sorted and repeats dropped)."""
    shard = read_shard_codes(path, expected_sha256=expected_sha256, max_label_bytes=max_label_bytes)
    label_codes, labels = _sorted_codes(shard.entry_codes, shard.dictionary)
    example_codes, label_codes = distinct_pairs(shard.example_codes, label_codes, len(labels))
    return Annotations(
        path=shard.path,
        sha256=shard.sha256,
        labels=labels,
        example_codes=example_codes,
        label_codes=label_codes,
        n_examples=shard.n_examples,
        n_rows=shard.n_rows,
        example_ids=shard.example_ids,
    )


def read_shard_codes(
    path: str | Path, *, expected_sha256: str | None = None, max_label_bytes: int = MAX_LABEL_BYTES
) -> ShardCodes:
    """Read one shard, validate it against the contract and encode its examples and label values as codes.

    Raises :class:`ShardError` on the first violation: unreadable or non-Parquet file, missing or unknown
    columns, wrong types, nulls, empty label lists, empty or over-long labels, invalid UTF-8, NaN or
    out-of-range confidence; or, with ``expected_sha256`` (the hash the shard had when it was listed), if the
    file changed since. The bytes are read once, and the hash and the counts come from the same bytes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        sha = "sha256:" + hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise ShardError(
                path,
                f"changed after it was listed (content {sha[:19]}..., listed as {expected_sha256[:19]}...): "
                "not counted; the next run counts its new content",
            )
        parquet = pq.ParquetFile(pa.BufferReader(data))
        label_column = _check_schema(path, parquet.schema_arrow)
        # Labels as Arrow dictionaries, straight from Parquet's dictionary pages: each distinct label is decoded,
        # validated and sorted once, not once per annotation (2-3x faster reads, docs/performance.md).
        reader = pq.ParquetFile(
            pa.BufferReader(data), metadata=parquet.metadata, read_dictionary=_leaves(parquet, label_column)
        )
        # Row group by row group: each has its own dictionary, and Arrow cannot read a list of dictionaries that
        # change within one call ("nested data conversions not implemented for chunked array outputs").
        groups = [reader.read_row_group(i) for i in range(reader.num_row_groups)]
        table = pa.concat_tables(groups) if groups else reader.read()
    except ShardError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:  # pyarrow's errors for empty, corrupt or foreign files
        raise ShardError(path, f"not a readable Parquet file ({exc})") from None
    del data, parquet, reader, groups

    n_rows = table.num_rows
    ids = table.column(ID_COLUMN).combine_chunks()
    row = _first_true(pc.is_null(ids))
    if row is not None:
        raise ShardError(path, "null example id", row=row, column=ID_COLUMN)
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        _check_utf8(path, ids, ID_COLUMN, None)
        row = _first_true(pc.equal(pc.utf8_length(ids), 0))
        if row is not None:
            raise ShardError(path, "empty example id", row=row, column=ID_COLUMN)

    keep_rows = None
    if CONFIDENCE_COLUMN in table.column_names:
        conf = pc.cast(table.column(CONFIDENCE_COLUMN).combine_chunks(), pa.float64())
        row = _first_true(pc.is_null(conf))
        if row is not None:
            raise ShardError(path, "null confidence", row=row, column=CONFIDENCE_COLUMN)
        conf_np = conf.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~((conf_np >= 0.0) & (conf_np <= 1.0)))  # catches NaN too
        if bad.size:
            raise ShardError(
                path,
                f"confidence must be in [0, 1], found {conf_np[bad[0]]!r}",
                row=int(bad[0]),
                column=CONFIDENCE_COLUMN,
            )
        keep_rows = conf_np > 0.0  # confidence 0 is an explicit negative: not counted

    column = table.column(label_column)
    row = _first_true(pc.is_null(column))
    if row is not None:
        raise ShardError(
            path,
            "null label" if label_column == LONG_COLUMN else "null label list",
            row=row,
            column=label_column,
        )
    if label_column == LIST_COLUMN:
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        row = np.flatnonzero(lengths == 0)
        if row.size:
            raise ShardError(
                path,
                "empty label list (an example without labels has no row)",
                row=int(row[0]),
                column=label_column,
            )
        row_of_value = np.repeat(np.arange(n_rows, dtype=index_dtype(n_rows)), lengths)
        column = pc.list_flatten(column)
    else:
        row_of_value = None
    codes, vocab = _dictionary_codes(path, column)
    del table, column

    def first_use(bad_entries: np.ndarray) -> int | None:
        """Index of the first value that is one of the dictionary's ``bad_entries`` (a mask), if any."""
        if not bad_entries.any():  # the usual case: no pass over every annotation
            return None
        hits = np.flatnonzero(bad_entries[codes])
        return int(hits[0]) if hits.size else None

    def first_row(bad_entries: np.ndarray) -> int | None:
        i = first_use(bad_entries)
        return None if i is None else _row(row_of_value, i)

    if codes.size and codes.min() < 0:
        null_value = int(np.argmax(codes < 0))
        message = "null label in list" if label_column == LIST_COLUMN else "null label"
        raise ShardError(path, message, row=_row(row_of_value, null_value), column=label_column)
    _check_utf8(path, vocab, label_column, first_row)
    byte_lengths = pc.binary_length(vocab).to_numpy(zero_copy_only=False)
    row = first_row(byte_lengths == 0)
    if row is not None:
        raise ShardError(path, "empty label", row=row, column=label_column)
    i = first_use(byte_lengths > max_label_bytes)
    if i is not None:
        raise ShardError(
            path,
            f"label of {int(byte_lengths[codes[i]])} bytes exceeds the limit of {max_label_bytes}",
            row=_row(row_of_value, i),
            column=label_column,
        )

    # Each value's example: the row's, when row i is example i (increasing integer ids, the common case).
    example_of_row, example_ids = _example_codes(ids)
    if row_of_value is None:
        example_of_value = np.arange(n_rows, dtype=index_dtype(n_rows)) if example_of_row is None else example_of_row
    else:
        example_of_value = row_of_value if example_of_row is None else example_of_row[row_of_value]
    hashes = hash_example_ids(example_ids)
    if keep_rows is not None:
        keep_values = keep_rows if row_of_value is None else keep_rows[row_of_value]
        example_of_value = example_of_value[keep_values]
        codes = codes[keep_values]
        # Examples that only had negatives vanish; renumber the rest densely (bincount, not np.unique: its
        # hash-based path was the slowest step of counting). Without negatives every example has a value.
        present = np.bincount(example_of_value, minlength=hashes.size) > 0
        if not present.all():
            renumber = (np.cumsum(present) - 1).astype(example_of_value.dtype)
            example_of_value = renumber[example_of_value]
            hashes = hashes[present]
    return ShardCodes(
        path=path,
        sha256=sha,
        dictionary=vocab,
        example_codes=example_of_value,
        entry_codes=codes,
        n_examples=int(hashes.size),
        n_rows=n_rows,
        example_ids=np.sort(hashes),
    )


def distinct_pairs(example_codes: np.ndarray, label_codes: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(example, label) codes sorted and distinct. Returned as given, after one pass to check them, when each
    example is one row with its labels sorted and distinct (as the generator and many exporters write them);
    otherwise sorted, and repeats dropped (an example's labels are a set)."""
    if _sorted_distinct(example_codes, label_codes):
        return example_codes, label_codes
    m = max(m, 1)
    keys = example_codes.astype(np.int64) * m + label_codes
    keys.sort()
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    return (keys // m).astype(example_codes.dtype), (keys % m).astype(label_codes.dtype)


def _sorted_distinct(example_codes: np.ndarray, label_codes: np.ndarray) -> bool:
    """Whether the pairs are strictly increasing (by example, then label), without forming int64 keys."""
    if example_codes.size < 2:
        return True
    ex_next, ex = example_codes[1:], example_codes[:-1]
    if not np.all(ex_next >= ex):
        return False
    return bool(np.all((ex_next != ex) | (label_codes[1:] > label_codes[:-1])))


def index_dtype(*sizes: int) -> type:
    """int32 codes, indices and counts while every size fits: half the memory of int64 in every per-value and
    per-pair array (4 bytes per code when reading and counting, 12 bytes per stored pair instead of 16)."""
    return np.int32 if max(sizes, default=0) < 2**31 - 1 else np.int64


def _leaves(parquet: pq.ParquetFile, column: str) -> list[str]:
    """Parquet paths of a column's string leaves (``labels.list.element`` or another writer's spelling)."""
    schema = parquet.schema
    return [
        schema.column(i).path
        for i in range(len(schema))
        if schema.column(i).path.split(".")[0] == column and schema.column(i).physical_type == "BYTE_ARRAY"
    ]


def _dictionary_codes(path: Path, labels: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Each value's index into one dictionary of its column's strings (-1 for a null), whatever the chunks: each
    row group comes with its own dictionary, and some writers store plain strings. One chunk without nulls (the
    usual shard) hands over Arrow's own indices, uncopied."""
    chunks = labels.chunks if isinstance(labels, pa.ChunkedArray) else [labels]
    codes, dictionaries, offset = [], [], 0
    for chunk in chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(chunk)
        dictionary = chunk.dictionary if len(chunks) == 1 else chunk.dictionary.cast(pa.large_string())
        has_nulls = chunk.indices.null_count > 0
        index = pc.fill_null(chunk.indices, -1) if has_nulls else chunk.indices
        index = index.to_numpy(zero_copy_only=False)
        if index.size and (index.max() >= len(dictionary) or (not has_nulls and index.min() < 0)):
            raise ShardError(path, "not a readable Parquet file (label dictionary index out of range)")
        if len(chunks) == 1 and not has_nulls and not dictionary.null_count and index.dtype.itemsize <= 4:
            return index, dictionary
        valid = index >= 0
        if dictionary.null_count:
            valid &= dictionary.is_valid().to_numpy(zero_copy_only=False)[np.maximum(index, 0)]
        codes.append(np.where(valid, index.astype(np.int64) + offset, -1))
        dictionaries.append(dictionary)
        offset += len(dictionary)
    if not dictionaries:
        return np.empty(0, np.int32), pa.array([], pa.large_string())
    return np.concatenate(codes).astype(index_dtype(offset)), pa.concat_arrays(dictionaries)


def _sorted_codes(codes: np.ndarray, dictionary: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Codes into the sorted distinct labels the codes use, and those labels: dictionaries may repeat a value
    (across row groups) or hold values no kept row uses (negatives). Repeats are found as equal neighbours
    once sorted, which costs far less than hashing every label again."""
    used = np.flatnonzero(np.bincount(codes, minlength=len(dictionary)))
    values = dictionary.take(pa.array(used))
    order = pc.sort_indices(values).to_numpy(zero_copy_only=False)
    ordered = values.take(pa.array(order))
    new = np.ones(order.size, bool)
    if order.size > 1:
        new[1:] = pc.not_equal(ordered.slice(1), ordered.slice(0, order.size - 1)).to_numpy(zero_copy_only=False)
    dtype = index_dtype(codes.size)
    code_of_entry = np.full(len(dictionary), -1, dtype)
    code_of_entry[used[order]] = np.cumsum(new) - 1
    return code_of_entry[codes], ordered.filter(pa.array(new))


def _example_codes(ids: pa.Array) -> tuple[np.ndarray | None, pa.Array]:
    """Each row's example number (in order of first appearance; None when row i is example i) and the distinct
    ids: increasing integer ids (the common case: one row per example, in order) need no hashing."""
    if pa.types.is_integer(ids.type) and len(ids) > 0:
        values = ids.to_numpy(zero_copy_only=False)
        if np.all(values[1:] > values[:-1]):
            return None, ids
    encoded = pc.dictionary_encode(ids)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(index_dtype(len(ids))), encoded.dictionary


def _row(row_of_value: np.ndarray | None, index: int) -> int:
    return int(row_of_value[index]) if row_of_value is not None else index


def write_annotation_shard(
    path: str | Path,
    example_ids: Sequence[int] | Sequence[str] | np.ndarray,
    label_lists: Sequence[Sequence[str]],
    *,
    compression: str = "zstd",
) -> Path:
    """Write a list-form shard (``example_id``, ``labels``). Used by importers, the generator and tests."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(example_ids)
    id_array = (
        pa.array(ids, type=pa.int64())
        if np.issubdtype(ids.dtype, np.integer)
        else pa.array([str(x) for x in ids], type=pa.string())
    )
    table = pa.table({ID_COLUMN: id_array, LIST_COLUMN: pa.array(label_lists, type=pa.list_(pa.string()))})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression=compression)
    tmp.replace(path)
    return path
