"""Importers: turn common multi-label formats into an *import directory* of annotation and feature shards.

Two source formats are read, each as a binary label matrix ``Y`` (n x m) and a feature matrix ``X`` (n x d):

- the Extreme Classification Repository text format (:func:`parse_xc`): a header line ``n d m``, then one
  line per example, ``l1,l2,... f:v f:v ...`` with 0-based indices; an example without labels has an empty
  label field, so its line starts with a space. A header-less LIBSVM multi-label file (such as yeast) is
  accepted too: its dimensions are inferred, and its feature indices are taken as 1-based when no index 0
  occurs in any input file (the LIBSVM convention, as in scikit-learn's
  ``load_svmlight_file(zero_based="auto")``);
- ARFF (:func:`parse_arff`) with sparse ``{i v, ...}`` or dense rows. Which attributes are labels is said by
  a Mulan label XML (the attributes it names; Mulan puts them last), or by the MEKA convention in the
  relation name, ``@relation 'NAME: -C L'``: the first L attributes are labels, or the last -L when L is
  negative.

:func:`import_xc` and :func:`import_arff` write the import directory that ``embed`` and ``train`` read
(layout in ``docs/architecture.md``), with the source's train/test split, or a seeded random split when only a
training file is given::

    >>> import_arff("bibtex-train.arff", "bibtex-test.arff", "data/bibtex", xml="bibtex.xml")
    >>> import_xc("yeast_train.txt", None, "data/yeast", test_fraction=0.2, seed=0)

Parsing is vectorized: Python touches each *line* once (C-level ``str`` methods), and the tokens are
converted by numpy in bulk, so delicious (16k examples, 3.8 MB of ARFF) parses in well under a second. Only
when the fast path finds something wrong does a strict line-by-line pass run, to report the first bad line.
Errors raise :class:`SourceFormatError` (a :class:`~pmi_pipeline.errors.ShardError` whose ``row`` is the
1-based line number).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import math
import os
import re
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from pmi_pipeline.errors import PipelineError, ShardError
from pmi_pipeline.features import write_feature_shard

__all__ = [
    "ParsedSource",
    "SourceFormatError",
    "import_arff",
    "import_xc",
    "meka_label_count",
    "parse_arff",
    "parse_xc",
    "read_label_names_file",
    "read_mulan_xml",
    "write_import_dir",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class SourceFormatError(ShardError):
    """Bad input in a text source file: ``row`` is the 1-based line number.

    The message reads ``FILE:LINE: ...`` like a compiler's, so that an editor can jump to it.
    """

    def __init__(self, path: PathLike, line: int | None, message: str, *, column: str | None = None):
        super().__init__(path, message, row=line, column=column)
        self.line = line
        where = self.path if line is None else f"{self.path}:{line}"
        if column is not None:
            where += f" (column {column!r})"
        self.args = (f"{where}: {message}",)


@dataclass
class ParsedSource:
    """One parsed source file: binary labels ``Y``, features ``X``; row ``i`` came from line ``lines[i]``."""

    path: Path
    Y: sp.csr_matrix  # (n, m) int8, entries 1, sorted indices
    X: sp.csr_matrix  # (n, d) float32, canonical
    label_names: list[str]
    lines: np.ndarray  # 1-based line number of each example
    format: str
    feature_names: list[str] | None = field(default=None, repr=False)

    @property
    def n_examples(self) -> int:
        return int(self.Y.shape[0])


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def _read_lines(path: Path) -> list[str]:
    """The lines of a text file (``.gz``, ``.bz2`` and ``.xz`` are decompressed), without line terminators."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError as exc:
        raise PipelineError(f"{path}: no such file") from exc
    except OSError as exc:
        raise SourceFormatError(path, None, f"cannot read ({exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("%s is not UTF-8; reading it as latin-1", path)
        text = raw.decode("latin-1")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _to_int(tokens: list[str]) -> np.ndarray | None:
    try:
        return np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        return None


def _to_float(tokens: list[str]) -> np.ndarray | None:
    try:
        return np.array(tokens, dtype=np.float64)
    except ValueError:
        return None


def _row_of(counts_cumsum: np.ndarray, flat: int) -> int:
    """The row that flat entry ``flat`` belongs to, given the cumulative per-row entry counts."""
    return int(np.searchsorted(counts_cumsum, flat, side="right"))


def _first_repeat(M: sp.csr_matrix) -> tuple[int, int] | None:
    """(row, column) of the first index repeated within a row of a CSR matrix with sorted indices, if any."""
    row = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))
    dup = np.flatnonzero((np.diff(M.indices) == 0) & (np.diff(row) == 0))
    return (int(row[dup[0]]), int(M.indices[dup[0]])) if dup.size else None


def _binary_csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A 0/1 int8 CSR matrix; repeated (row, col) pairs collapse (an example's labels are a set)."""
    Y = sp.csr_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=shape)
    Y.sum_duplicates()
    Y.data[:] = 1
    return Y


def read_label_names_file(path: PathLike) -> list[str]:
    """Label names, one per line (the ``label_names.txt`` beside an XC file): line ``i`` names label ``i``."""
    return _read_lines(Path(path))


# ----------------------------------------------------------------------------------------------------------
# Extreme Classification Repository text format


_HEADER = re.compile(r"\s*(\d+)\s+(\d+)\s+(\d+)\s*")
# a token with two colons, or a colon at the edge of a token: "1:2:3", "5:", ":5"
_BAD_PAIR = re.compile(r":\S*:|:(?=\s|$)|(?:^|(?<=\s)):")


@dataclass
class _XCRaw:
    path: Path
    header: tuple[int, int, int] | None
    n: int
    label_rows: np.ndarray
    label_idx: np.ndarray
    feat_rows: np.ndarray
    feat_idx: np.ndarray
    feat_val: np.ndarray
    first_line: int  # line number of example 0


def _xc_read(path: Path) -> _XCRaw:
    lines = _read_lines(path)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SourceFormatError(path, 1, "empty file")
    m = _HEADER.fullmatch(lines[0])
    header = (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None
    first = 1 if header else 0
    body = lines[first:]
    n = len(body)
    if header is not None and header[0] != n:
        # short: point at the last line (truncated file); long: at the first line too many
        line = first + n if n < header[0] else first + header[0] + 1
        raise SourceFormatError(path, line, f"the header says {header[0]} examples but the file has {n} example lines")

    label_parts: list[str] = []
    feat_parts: list[str] = []
    n_labels = np.zeros(n, dtype=np.int64)
    n_pairs = np.zeros(n, dtype=np.int64)
    for i, line in enumerate(body):
        if "\t" in line:
            line = line.replace("\t", " ")
        lab, _, feat = line.partition(" ")
        if lab:
            label_parts.append(lab)
            n_labels[i] = lab.count(",") + 1
        if feat:
            feat_parts.append(feat)
            n_pairs[i] = feat.count(":")

    def locate() -> SourceFormatError:
        for i, line in enumerate(body):
            message = _xc_check_line(line)
            if message:
                return SourceFormatError(path, first + i + 1, message)
        return SourceFormatError(path, None, "malformed file (no single bad line found)")

    label_idx = _to_int(",".join(label_parts).split(",")) if label_parts else np.zeros(0, np.int64)
    if label_idx is None or label_idx.size != n_labels.sum():
        raise locate()
    joined = " ".join(feat_parts)
    if _BAD_PAIR.search(joined):
        raise locate()
    numbers = joined.replace(":", " ").split()
    if len(numbers) != 2 * n_pairs.sum():
        raise locate()
    feat_idx = _to_int(numbers[0::2])
    feat_val = _to_float(numbers[1::2])
    if feat_idx is None or feat_val is None:
        raise locate()
    rows = np.arange(n)
    return _XCRaw(
        path=path,
        header=header,
        n=n,
        label_rows=np.repeat(rows, n_labels),
        label_idx=label_idx,
        feat_rows=np.repeat(rows, n_pairs),
        feat_idx=feat_idx,
        feat_val=feat_val,
        first_line=first + 1,
    )


def _xc_check_line(line: str) -> str | None:
    """Why one XC line is malformed, or None. The strict, slow reference for the vectorized reader."""
    lab, _, feat = line.replace("\t", " ").partition(" ")
    if lab:
        for token in lab.split(","):
            if not token.strip().lstrip("+-").isdigit():
                return f"bad label index {token!r} in label field {lab!r}"
    for token in feat.split():
        index, colon, value = token.partition(":")
        if not colon or not index or not value:
            return f"feature token {token!r} is not index:value (truncated line?)"
        if not index.lstrip("+-").isdigit():
            return f"bad feature index {index!r} in {token!r}"
        try:
            float(value)
        except ValueError:
            return f"bad feature value {value!r} in {token!r}"
    return None


def _xc_check_range(raw: _XCRaw, n_labels: int, n_features: int, feature_shift: int) -> None:
    for what, idx, rows, bound in (
        ("label", raw.label_idx, raw.label_rows, n_labels),
        ("feature", raw.feat_idx - feature_shift, raw.feat_rows, n_features),
    ):
        bad = np.flatnonzero((idx < 0) | (idx >= bound))
        if bad.size:
            k = int(bad[0])
            shown = int(idx[k]) + (feature_shift if what == "feature" else 0)
            extra = " (1-based)" if what == "feature" and feature_shift else ""
            raise SourceFormatError(
                raw.path,
                raw.first_line + int(rows[k]),
                f"{what} index {shown}{extra} out of range: there are {bound} {what}s",
            )
    bad = np.flatnonzero(~(np.abs(raw.feat_val) <= np.finfo(np.float32).max))  # NaN, inf, or inf as float32
    if bad.size:
        k = int(bad[0])
        raise SourceFormatError(
            raw.path, raw.first_line + int(raw.feat_rows[k]), f"feature value {raw.feat_val[k]} is not finite"
        )


def _xc_to_source(
    raw: _XCRaw, n_labels: int, n_features: int, feature_shift: int, label_names: list[str], fmt: str
) -> ParsedSource:
    _xc_check_range(raw, n_labels, n_features, feature_shift)
    Y = _binary_csr(raw.label_rows, raw.label_idx, (raw.n, n_labels))
    indptr = np.r_[0, np.cumsum(np.bincount(raw.feat_rows, minlength=raw.n))]
    X = sp.csr_matrix(
        (raw.feat_val.astype(np.float32), raw.feat_idx - feature_shift, indptr), shape=(raw.n, n_features)
    )
    X.sort_indices()
    rep = _first_repeat(X)
    if rep is not None:
        raise SourceFormatError(raw.path, raw.first_line + rep[0], f"feature index {rep[1] + feature_shift} repeated")
    X.eliminate_zeros()
    lines = raw.first_line + np.arange(raw.n)
    return ParsedSource(raw.path, Y, X, label_names, lines, fmt)


def _xc_dims(raws: Sequence[_XCRaw], label_names: list[str] | None) -> tuple[int, int, int, str]:
    """(n_labels, n_features, feature_shift, format) agreed by all the files of one import."""
    headers = [r.header for r in raws]
    if all(h is not None for h in headers):
        dims = {(h[1], h[2]) for h in headers if h is not None}
        if len(dims) > 1:
            raise SourceFormatError(raws[1].path, 1, f"header dimensions {sorted(dims)} differ from {raws[0].path}")
        d, m = dims.pop()
        return m, d, 0, "xc"
    if any(h is not None for h in headers):
        raise PipelineError(f"{[str(r.path) for r in raws]}: mixing files with and without an 'n d m' header")
    # header-less LIBSVM: infer the dimensions; 1-based features when no file uses index 0
    feat_min = min((int(r.feat_idx.min()) for r in raws if r.feat_idx.size), default=0)
    shift = 1 if feat_min >= 1 else 0
    d = max((int(r.feat_idx.max()) + 1 - shift for r in raws if r.feat_idx.size), default=0)
    m = max((int(r.label_idx.max()) + 1 for r in raws if r.label_idx.size), default=0)
    if label_names is not None:
        m = max(m, len(label_names))
    return m, d, shift, "libsvm"


def _resolve_label_names(
    label_names: PathLike | Sequence[str] | None,
) -> tuple[list[str] | None, Path | None]:
    """(names, the file they came from) for a ``label_names`` argument that is a file, a sequence or None."""
    if label_names is None:
        return None, None
    if isinstance(label_names, (str, os.PathLike)):
        path = Path(label_names)
        return read_label_names_file(path), path
    return list(label_names), None


def _xc_label_names(names: list[str] | None, names_file: Path | None, m: int) -> list[str]:
    if names is None:
        return [str(j) for j in range(m)]
    if len(names) != m:
        if names_file is not None:
            raise SourceFormatError(names_file, None, f"{len(names)} label names for {m} labels")
        raise PipelineError(f"{len(names)} label names given for {m} labels")
    return names


def parse_xc(path: PathLike, *, label_names: PathLike | Sequence[str] | None = None) -> ParsedSource:
    """Parse one Extreme Classification Repository file (or a header-less LIBSVM multi-label file).

    ``label_names``: a file with one name per line, or a sequence; default: the label indices as strings.
    """
    raw = _xc_read(Path(path))
    names, names_file = _resolve_label_names(label_names)
    m, d, shift, fmt = _xc_dims([raw], names)
    return _xc_to_source(raw, m, d, shift, _xc_label_names(names, names_file, m), fmt)


# ----------------------------------------------------------------------------------------------------------
# ARFF (Mulan and MEKA)


_ATTRIBUTE = re.compile(r"@attribute\s+('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s{]+)\s*(.*)", re.IGNORECASE)
_RELATION = re.compile(r"@relation\s+(.*)", re.IGNORECASE)
_MEKA_C = re.compile(r"(?:^|\s)-C\s+(-?\d+)")
_SPARSE_ROW = re.compile(r"\s*[^\s,]+\s+[^\s,]+\s*(?:,\s*[^\s,]+\s+[^\s,]+\s*)*")


def _unquote(token: str) -> str:
    token = token.strip()
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


@dataclass
class _Attribute:
    name: str
    nominal: list[str] | None  # None: numeric


@dataclass
class _ArffHeader:
    relation: str
    attributes: list[_Attribute]
    data_line: int  # 1-based line number of @data


def _arff_header(path: Path, lines: list[str]) -> _ArffHeader:
    relation = ""
    attributes: list[_Attribute] = []
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("%"):
            continue
        low = s[:10].lower()
        if low.startswith("@relation"):
            m = _RELATION.match(s)
            relation = _unquote(m.group(1)) if m else ""
        elif low.startswith("@attribute"):
            m = _ATTRIBUTE.match(s)
            if not m or not m.group(2).strip():
                raise SourceFormatError(path, i + 1, f"malformed @attribute line {s[:80]!r}")
            name, kind = _unquote(m.group(1)), m.group(2).strip()
            if m.group(1)[0] not in "'\"":
                name = m.group(1)  # unquoted names are kept verbatim (Mulan's XML uses them so: TAG_m\'usica)
            if kind.startswith("{"):
                if not kind.endswith("}"):
                    raise SourceFormatError(path, i + 1, f"unterminated nominal type {kind[:80]!r}", column=name)
                values = [_unquote(v) for v in kind[1:-1].split(",")]
                attributes.append(_Attribute(name, values))
            elif kind.split()[0].lower() in ("numeric", "real", "integer"):
                attributes.append(_Attribute(name, None))
            else:
                raise SourceFormatError(path, i + 1, f"unsupported attribute type {kind[:40]!r}", column=name)
        elif low.startswith("@data"):
            if not attributes:
                raise SourceFormatError(path, i + 1, "@data before any @attribute")
            return _ArffHeader(relation, attributes, i + 1)
        elif s.startswith("@"):
            raise SourceFormatError(path, i + 1, f"unsupported declaration {s.split()[0]!r}")
        else:
            raise SourceFormatError(path, i + 1, f"unexpected line before @data: {s[:80]!r}")
    raise SourceFormatError(path, None, "no @data section")


def meka_label_count(relation: str) -> int | None:
    """The L of a MEKA relation name ``'NAME: -C L ...'``, or None when it has no ``-C`` option.

    L > 0: the first L attributes are labels; L < 0: the last -L.
    """
    m = _MEKA_C.search(relation)
    return int(m.group(1)) if m else None


def read_mulan_xml(path: PathLike) -> list[str]:
    """The label names of a Mulan label XML, in document order (hierarchies are flattened)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError as exc:
        raise PipelineError(f"{path}: no such file") from exc
    except ET.ParseError as exc:
        raise SourceFormatError(path, exc.position[0], f"not valid XML ({exc})") from exc
    names = [el.get("name") for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "label"]
    if not names or any(n is None for n in names):
        raise SourceFormatError(path, None, "expected <label name=...> elements")
    return [n for n in names if n is not None]


def _arff_values(
    path: Path, tokens: list[str], attrs: np.ndarray, lines: np.ndarray, header: _ArffHeader
) -> np.ndarray:
    """Numbers for value tokens; ``attrs[k]`` is the attribute of token k and ``lines[k]`` its line.

    The fast path reads every token as a number (Mulan's nominal {0,1} values are numbers). When that fails, a
    per-token pass maps nominal values that are not numbers to their index (Weka's internal value) and reports
    the first token that is neither."""
    values = _to_float(tokens)
    if values is not None and np.isfinite(values).all():
        return values
    values = np.empty(len(tokens), dtype=np.float64)
    maps: dict[int, dict[str, int]] = {}
    for k, token in enumerate(tokens):
        a = int(attrs[k])
        attribute = header.attributes[a]
        t = _unquote(token)
        if t == "?":
            raise SourceFormatError(
                path, int(lines[k]), "missing values ('?') are not supported", column=attribute.name
            )
        try:
            v = float(t)
        except ValueError:
            v = math.nan
        if math.isfinite(v):
            values[k] = v
            continue
        if attribute.nominal is not None:
            index = maps.setdefault(a, {s: j for j, s in enumerate(attribute.nominal)}).get(t)
            if index is not None:
                values[k] = index
                continue
        raise SourceFormatError(path, int(lines[k]), f"bad value {token!r}", column=attribute.name)
    return values


def _arff_matrix(path: Path, lines: list[str], header: _ArffHeader) -> tuple[sp.csr_matrix, np.ndarray]:
    """All attributes of all rows as one (n, A) float64 CSR matrix, and the line number of each row."""
    n_attr = len(header.attributes)
    row_lines: list[int] = []
    sparse_parts: list[str] = []
    sparse_rows: list[int] = []
    sparse_pairs: list[int] = []
    dense_parts: list[str] = []
    dense_rows: list[int] = []
    for i in range(header.data_line, len(lines)):
        s = lines[i].strip()
        if not s or s[0] == "%":
            continue
        r = len(row_lines)
        row_lines.append(i + 1)
        if s[0] == "{":
            if not s.endswith("}"):
                raise SourceFormatError(path, i + 1, "sparse row does not end with '}' (truncated line?)")
            inner = s[1:-1]
            if inner.strip():
                if not _SPARSE_ROW.fullmatch(inner):
                    raise SourceFormatError(path, i + 1, "malformed sparse row: expected {index value, ...}")
                sparse_parts.append(inner)
                sparse_rows.append(r)
                sparse_pairs.append(inner.count(",") + 1)
        else:
            if s.count(",") != n_attr - 1:
                raise SourceFormatError(
                    path,
                    i + 1,
                    f"dense row has {s.count(',') + 1} values, expected {n_attr} (truncated line?)",
                )
            dense_parts.append(s)
            dense_rows.append(r)
    n = len(row_lines)
    line_of_row = np.asarray(row_lines, dtype=np.int64)

    rows_list, cols_list, vals_list = [], [], []
    if sparse_parts:
        numbers = ",".join(sparse_parts).replace(",", " ").split()
        pairs = np.asarray(sparse_pairs, dtype=np.int64)
        row_of_pair = np.repeat(np.asarray(sparse_rows, dtype=np.int64), pairs)
        cols = _to_int(numbers[0::2])
        if cols is None:
            for k, token in enumerate(numbers[0::2]):
                if not token.isdigit():
                    raise SourceFormatError(path, int(line_of_row[row_of_pair[k]]), f"bad attribute index {token!r}")
            raise SourceFormatError(path, None, "attribute index too large")
        bad = np.flatnonzero((cols < 0) | (cols >= n_attr))
        if bad.size:
            k = int(bad[0])
            raise SourceFormatError(
                path,
                int(line_of_row[row_of_pair[k]]),
                f"attribute index {cols[k]} out of range: there are {n_attr} attributes",
            )
        vals = _arff_values(path, numbers[1::2], cols, line_of_row[row_of_pair], header)
        rows_list.append(row_of_pair)
        cols_list.append(cols)
        vals_list.append(vals)
    if dense_parts:
        tokens = [t.strip() for t in ",".join(dense_parts).split(",")]
        row_of_value = np.repeat(np.asarray(dense_rows, dtype=np.int64), n_attr)
        cols = np.tile(np.arange(n_attr, dtype=np.int64), len(dense_parts))
        vals = _arff_values(path, tokens, cols, line_of_row[row_of_value], header)
        nz = vals != 0
        rows_list.append(row_of_value[nz])
        cols_list.append(cols[nz])
        vals_list.append(vals[nz])
    if rows_list:
        rows, cols, vals = (np.concatenate(v) for v in (rows_list, cols_list, vals_list))
    else:
        rows = cols = np.zeros(0, np.int64)
        vals = np.zeros(0, np.float64)
    order = np.lexsort((cols, rows))
    M = sp.csr_matrix(
        (vals[order], cols[order], np.r_[0, np.cumsum(np.bincount(rows, minlength=n))]), shape=(n, n_attr)
    )
    rep = _first_repeat(M)
    if rep is not None:
        raise SourceFormatError(path, int(line_of_row[rep[0]]), f"attribute index {rep[1]} repeated in a sparse row")
    return M, line_of_row


def _label_columns(path: Path, header: _ArffHeader, label_names: Sequence[str] | None, xml: Path | None) -> list[int]:
    """Attribute indices of the labels, in label order."""
    names = [a.name for a in header.attributes]
    if label_names is not None:
        where: dict[str, list[int]] = {}
        for j, name in enumerate(names):
            where.setdefault(name, []).append(j)
        cols = []
        for label in label_names:
            found = where.get(label, [])
            if len(found) != 1:
                problem = "is not an attribute" if not found else "names several attributes"
                raise SourceFormatError(xml or path, None, f"label {label!r} {problem} of {path}")
            cols.append(found[0])
        return cols
    count = meka_label_count(header.relation)
    if count is None or count == 0:
        raise PipelineError(
            f"{path}: cannot tell which attributes are labels: give the Mulan label XML (--xml), "
            f"or use a MEKA relation name '@relation \"NAME: -C L\"'"
        )
    if abs(count) >= len(names):
        raise SourceFormatError(path, None, f"-C {count} leaves no feature among {len(names)} attributes")
    return list(range(count)) if count > 0 else list(range(len(names) + count, len(names)))


def _parse_arff_file(
    path: Path, label_names: Sequence[str] | None, xml: Path | None
) -> tuple[ParsedSource, _ArffHeader]:
    lines = _read_lines(path)
    header = _arff_header(path, lines)
    label_cols = _label_columns(path, header, label_names, xml)
    M, line_of_row = _arff_matrix(path, lines, header)
    is_label = np.zeros(len(header.attributes), dtype=bool)
    is_label[label_cols] = True
    feature_cols = np.flatnonzero(~is_label)
    Y = sp.csr_matrix(M[:, label_cols])
    Y.eliminate_zeros()
    Y = sp.csr_matrix((np.ones(Y.nnz, np.int8), Y.indices, Y.indptr), shape=Y.shape)
    Y.sort_indices()
    X = sp.csr_matrix(M[:, feature_cols], dtype=np.float32)
    X.eliminate_zeros()
    X.sort_indices()
    source = ParsedSource(
        path=path,
        Y=Y,
        X=X,
        label_names=[header.attributes[j].name for j in label_cols],
        lines=line_of_row,
        format="arff",
        feature_names=[header.attributes[j].name for j in feature_cols],
    )
    return source, header


def parse_arff(
    path: PathLike, *, xml: PathLike | None = None, label_names: Sequence[str] | None = None
) -> ParsedSource:
    """Parse one ARFF file, sparse or dense rows (or both).

    The labels are the attributes named by ``label_names`` or by the Mulan label XML ``xml``, in that order;
    without either, the MEKA ``-C L`` option of the relation name decides. Every other attribute is a
    feature, in attribute order. A label is present when its value is not 0. Nominal values that are numbers
    are read as numbers, others as their index in the declaration (Weka's internal value).
    """
    xml_path = Path(xml) if xml is not None else None
    if label_names is None and xml_path is not None:
        label_names = read_mulan_xml(xml_path)
    return _parse_arff_file(Path(path), label_names, xml_path)[0]


# ----------------------------------------------------------------------------------------------------------
# the import directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise PipelineError(f"{out} exists and is not empty: pass force=True (--force) to replace it")


def _check_label_names(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for j, name in enumerate(names):
        if not name or "\n" in name or "\r" in name:
            raise PipelineError(f"label {j} has an empty name or one with a line break: {name!r}")
        if name in seen:
            raise PipelineError(f"label name {name!r} is used twice (labels are identified by name)")
        seen.add(name)


def _write_annotation_shard(path: Path, example_ids: np.ndarray, Y: sp.csr_matrix, names: pa.Array) -> None:
    """List-form annotation shard of the examples that have at least one label."""
    counts = np.diff(Y.indptr)
    keep = counts > 0
    offsets = np.r_[0, np.cumsum(counts[keep])].astype(np.int32)
    labels = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), names.take(pa.array(Y.indices)))
    table = pa.table({"example_id": pa.array(example_ids[keep], pa.int64()), "labels": labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def write_import_dir(
    out: PathLike,
    splits: dict[str, tuple[sp.csr_matrix, sp.csr_matrix]],
    label_names: Sequence[str],
    *,
    name: str,
    fmt: str,
    source: dict[str, Any],
    force: bool = False,
) -> dict[str, Any]:
    """Write an import directory from ``{split: (Y, X)}`` and return the content of its ``dataset.json``.

    Example ids run over all splits in the given order (train rows first, then test). Everything is written
    in a temporary directory beside ``out`` and renamed into place at the end, so ``out`` is either the
    previous content or the complete new one; an existing non-empty ``out`` is replaced only with ``force``.
    """
    out = Path(out)
    _check_out(out, force)
    _check_label_names(label_names)
    n_features = {X.shape[1] for _, X in splits.values()}
    if len(n_features) != 1:
        raise PipelineError(f"splits disagree on the feature dimension: {sorted(n_features)}")
    dim = n_features.pop()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    names = pa.array(list(label_names), pa.string())
    info: dict[str, Any] = {
        "name": name,
        "source": source,
        "format": fmt,
        "n_features": int(dim),
        "n_labels": len(label_names),
        "splits": {},
    }
    try:
        tmp.mkdir()
        (tmp / "labels.txt").write_text("".join(f"{n}\n" for n in label_names), encoding="utf-8")
        start = 0
        for split, (Y, X) in splits.items():
            if Y.shape[1] != len(label_names) or Y.shape[0] != X.shape[0]:
                raise PipelineError(f"split {split}: Y {Y.shape} and X {X.shape} do not fit {len(label_names)} labels")
            ids = np.arange(start, start + Y.shape[0], dtype=np.int64)
            start += Y.shape[0]
            _write_annotation_shard(tmp / "annotations" / split / "part-00000.parquet", ids, Y, names)
            write_feature_shard(tmp / "features" / split / "part-00000.parquet", ids, X, dim)
            per_example = np.diff(Y.indptr)
            info["splits"][split] = {
                "n_examples": int(Y.shape[0]),
                "n_annotations": int(Y.nnz),
                "n_without_labels": int((per_example == 0).sum()),
            }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _install(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` (``force``) is moved aside, then removed."""
    _check_out(out, force)  # again: someone may have written there while we parsed
    old = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _random_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, each in file order; the test set is a seeded random ``test_fraction``."""
    if not 0.0 < test_fraction < 1.0:
        raise PipelineError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(max(round(test_fraction * n), 1), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    test = np.sort(perm[:n_test])
    train = np.sort(perm[n_test:])
    return train, test


def _splits_from(
    train: ParsedSource, test: ParsedSource | None, test_fraction: float, seed: int
) -> tuple[dict[str, tuple[sp.csr_matrix, sp.csr_matrix]], dict[str, Any]]:
    if test is not None:
        return {"train": (train.Y, train.X), "test": (test.Y, test.X)}, {"method": "given"}
    tr, te = _random_split(train.n_examples, test_fraction, seed)
    splits = {"train": (train.Y[tr], train.X[tr]), "test": (train.Y[te], train.X[te])}
    return splits, {"method": "random", "test_fraction": test_fraction, "seed": seed}


def _file_info(path: Path) -> dict[str, str]:
    return {"path": str(path), "sha256": _sha256(path)}


def _default_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    return re.sub(r"[-_.]?(train|trn)$", "", stem, flags=re.IGNORECASE) or stem


def import_xc(
    train: PathLike,
    test: PathLike | None,
    out: PathLike,
    *,
    label_names: PathLike | Sequence[str] | None = None,
    name: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Import Extreme Classification Repository files into the import directory ``out``.

    Returns the content of its dataset.json.

    ``test`` None: ``train`` is split at random (``test_fraction``, ``seed``). ``label_names``: a file with
    one name per line (or a sequence); default: the label indices as strings. Header-less LIBSVM files are
    accepted (see the module docstring). Train and test must agree on the header's feature and label counts.
    """
    out = Path(out)
    _check_out(out, force)
    paths = [Path(train)] + ([Path(test)] if test is not None else [])
    raws = [_xc_read(p) for p in paths]
    given, names_file = _resolve_label_names(label_names)
    m, d, shift, fmt = _xc_dims(raws, given)
    names = _xc_label_names(given, names_file, m)
    parsed = [_xc_to_source(raw, m, d, shift, names, fmt) for raw in raws]
    splits, split_info = _splits_from(parsed[0], parsed[1] if test is not None else None, test_fraction, seed)
    source: dict[str, Any] = {
        "train": _file_info(paths[0]),
        "test": _file_info(paths[1]) if test is not None else None,
    }
    if names_file is not None:
        source["label_names"] = _file_info(names_file)
    if shift:
        source["feature_index_base"] = 1
    source["split"] = split_info
    info = write_import_dir(
        out, splits, names, name=name or _default_name(paths[0]), fmt=fmt, source=source, force=force
    )
    logger.info("imported %s into %s", [str(p) for p in paths], out)
    return info


def import_arff(
    train: PathLike,
    test: PathLike | None,
    out: PathLike,
    *,
    xml: PathLike | None = None,
    name: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Import Mulan or MEKA ARFF files into the import directory ``out``; returns its dataset.json.

    The labels are the attributes named in the Mulan label XML ``xml`` (in the XML's order); without it, the
    MEKA ``-C L`` option of the relation name decides. ``test`` None: ``train`` is split at random
    (``test_fraction``, ``seed``). Train and test must declare the same attributes.
    """
    out = Path(out)
    _check_out(out, force)
    xml_path = Path(xml) if xml is not None else None
    label_names = read_mulan_xml(xml_path) if xml_path is not None else None
    train_src, train_header = _parse_arff_file(Path(train), label_names, xml_path)
    test_src = None
    if test is not None:
        test_src, test_header = _parse_arff_file(Path(test), label_names, xml_path)
        ours = [(a.name, a.nominal) for a in train_header.attributes]
        theirs = [(a.name, a.nominal) for a in test_header.attributes]
        if ours != theirs:
            j = next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), len(ours))
            raise SourceFormatError(test, None, f"attributes differ from {train} (first at attribute {j})")
        if test_src.label_names != train_src.label_names:
            raise SourceFormatError(test, None, f"labels differ from {train}")
    splits, split_info = _splits_from(train_src, test_src, test_fraction, seed)
    source: dict[str, Any] = {
        "train": _file_info(Path(train)),
        "test": _file_info(Path(test)) if test is not None else None,
    }
    if xml_path is not None:
        source["xml"] = _file_info(xml_path)
    else:
        source["meka_C"] = meka_label_count(train_header.relation)
    source["split"] = split_info
    if name is None:
        if xml_path is not None:
            name = xml_path.stem
        elif ":" in train_header.relation:
            name = train_header.relation.split(":")[0].strip()
        else:
            name = _default_name(Path(train))
    info = write_import_dir(out, splits, train_src.label_names, name=name, fmt="arff", source=source, force=force)
    logger.info("imported %s into %s", train, out)
    return info
