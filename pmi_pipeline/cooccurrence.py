"""Label and label-pair co-occurrence counts, computed shard by shard and summed.

Counts form a commutative monoid: :meth:`Counts.merge` adds two of them over the union of their vocabularies, so
the total over a corpus is a tree-sum of per-batch counts (on Dask workers), and new shards add to what a store
already holds without recounting. Memory is bounded by one batch of shards plus the distinct pairs, never by the
corpus.

Per shard: the binary example x label matrix ``Y`` (CSR), ``Y.T @ Y`` gives pair counts off the diagonal and label
counts on it. Pairs are kept once, in the strict upper triangle of the vocabulary order.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from pmi_pipeline.errors import ShardError
from pmi_pipeline.example_ids import (
    ExampleIndex,
    FingerprintFiles,
    FingerprintWriter,
    Repeat,
    StoredFingerprints,
    find_repeats,
    hash_example_ids,
)
from pmi_pipeline.faults import fault_point
from pmi_pipeline.shards import (
    ID_COLUMN,
    Annotations,
    ShardCodes,
    distinct_pairs,
    index_dtype,
    read_annotations,
    read_shard_codes,
)
from pmi_pipeline.sort_dispatch import warn_if_sorting_slowly

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """Label counts, upper-triangular pair counts and the number of examples over a vocabulary.

    ``manifest`` maps each counted shard's content hash to what was counted from it, so that a shard is never
    counted twice.
    """

    labels: np.ndarray  # (m,) object array of str
    label_counts: np.ndarray  # (m,) int64
    # (m, m), strictly upper triangular: int64 from count_shards and Counts.sum; int32 inside a count (a batch's
    # counts, partial sums) while the examples counted fit, a third less to merge and move (see merge)
    pairs: sp.csr_matrix
    n_examples: int = 0
    manifest: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=object)
        self.label_counts = np.asarray(self.label_counts, dtype=np.int64)
        m = self.labels.size
        if self.label_counts.shape != (m,) or self.pairs.shape != (m, m):
            raise ValueError(
                f"inconsistent shapes: {m} labels, counts {self.label_counts.shape}, pairs {self.pairs.shape}"
            )

    def __reduce__(self) -> tuple[Callable[..., Counts], tuple[Any, ...]]:
        """Pickled with its labels as Arrow strings (:data:`_ARROW_LABELS`), which travel as a few buffers: counts
        move between Dask workers and to the client pickled. Counts over 669,561 labels pickled in 266 ms and
        unpickled in 162 ms with their labels as Python strings, against 102 and 110 ms so
        (bench/vocabulary_cost.py; docs/performance.md, fifteenth pass)."""
        arrow = _ARROW_LABELS.get(self.labels)
        return _counts_from_arrow, (arrow, self.label_counts, self.pairs, self.n_examples, self.manifest)

    @classmethod
    def empty(cls) -> Counts:
        return cls(np.empty(0, dtype=object), np.empty(0, np.int64), sp.csr_matrix((0, 0), dtype=np.int64))

    @property
    def n_labels(self) -> int:
        return int(self.labels.size)

    @property
    def n_annotations(self) -> int:
        return int(self.label_counts.sum())

    @property
    def n_pairs(self) -> int:
        return int(self.pairs.nnz)

    def reindex(self, labels: np.ndarray, position: np.ndarray | None = None) -> Counts:
        """The same counts over a vocabulary that contains this one's (new labels get zero counts).

        ``position`` (where each of this one's labels is in ``labels``) saves the lookup when already known.
        """
        labels = np.asarray(labels, dtype=object)
        if labels.size == self.labels.size and (
            np.array_equal(position, np.arange(labels.size))
            if position is not None
            else np.array_equal(labels, self.labels)
        ):
            return Counts(labels, self.label_counts, self.pairs, self.n_examples, dict(self.manifest))
        if position is None:
            position = _positions(self.labels, labels)
        if (position < 0).any():
            missing = self.labels[position < 0][:5].tolist()
            raise ValueError(f"target vocabulary lacks labels such as {missing}")
        label_counts = np.zeros(labels.size, np.int64)
        label_counts[position] = self.label_counts
        if position.size < 2 or np.all(np.diff(position) > 0):
            pairs = _remap_monotone(self.pairs, position, labels.size)
        else:
            coo = self.pairs.tocoo()
            pairs = _upper_csr(position[coo.row], position[coo.col], coo.data, labels.size)
        return Counts(labels, label_counts, pairs, self.n_examples, dict(self.manifest))

    def merge(self, other: Counts, *, sorted_union: bool = False) -> Counts:
        """Sum of two counts over the union of their vocabularies.

        The union is this one's labels, then ``other``'s new ones in sorted order (so a store's label order never
        changes), or, with ``sorted_union``, all labels sorted: merging two sorted counts that way only relabels
        indices, with no re-sorting of the pairs, which makes the tree-sum of per-shard counts cheap.
        """
        overlap = set(self.manifest) & set(other.manifest)
        if overlap:
            raise ValueError(f"shard(s) counted twice: {sorted(overlap)[:3]}")
        if sorted_union:
            labels, pos_a, pos_b = _sorted_union(self.labels, other.labels)
            a, b = self.reindex(labels, pos_a), other.reindex(labels, pos_b)
        else:
            known = set(self.labels.tolist())
            new = sorted(label for label in other.labels.tolist() if label not in known)
            labels = np.concatenate([self.labels, np.asarray(new, dtype=object)]) if new else self.labels
            a, b = self.reindex(labels), other.reindex(labels)
        n_examples = self.n_examples + other.n_examples
        if _count_dtype(n_examples) is np.int64:  # a pair counts at most once per example: int32 would overflow
            a, b = a.widened(), b.widened()
        return Counts(
            labels,
            a.label_counts + b.label_counts,
            (a.pairs + b.pairs).tocsr(),
            n_examples,
            {**self.manifest, **other.manifest},
        )

    def widened(self) -> Counts:
        """The same counts with int64 pair counts (sharing the index arrays): what callers of a count receive."""
        if self.pairs.dtype == np.int64:
            return self
        pairs = _with_count_type(self.pairs, np.int64)
        return Counts(self.labels, self.label_counts, pairs, self.n_examples, self.manifest)

    @staticmethod
    def sum(counts: Iterable[Counts]) -> Counts:
        """Sum over the sorted union of the vocabularies, merged pairwise as they come (``_RunningSum``, the same
        summation as :func:`count_shards`); the result is in sorted order."""
        running = _RunningSum(None)
        for c in counts:
            running.add(c)
        return running.result().widened()

    def sorted(self) -> Counts:
        """The same counts with the vocabulary in sorted order: a canonical form, whatever the merge order."""
        if _strictly_sorted(self.labels):  # the usual case: one pass, no sort
            return Counts(self.labels, self.label_counts, self.pairs, self.n_examples, dict(self.manifest))
        order = np.argsort(self.labels.astype(str), kind="stable")
        return self.reindex(self.labels[order])

    def equals(self, other: Counts) -> bool:
        """Same counts for the same labels, whatever the vocabulary order."""
        if set(self.labels.tolist()) != set(other.labels.tolist()) or self.n_examples != other.n_examples:
            return False
        b = other.reindex(self.labels)
        return bool(np.array_equal(self.label_counts, b.label_counts) and (self.pairs != b.pairs).nnz == 0)

    def save(self, path: str | Path) -> Path:
        """Save to one ``.npz`` file (used to pass counts between processes and to cache per-shard counts)."""
        path = Path(path)
        coo = self.pairs.tocoo()
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(
            tmp,
            labels=self.labels.astype(str),
            label_counts=self.label_counts,
            pair_row=coo.row.astype(np.int64),
            pair_col=coo.col.astype(np.int64),
            pair_count=coo.data.astype(np.int64),
            meta=np.asarray(json.dumps({"n_examples": self.n_examples, "manifest": self.manifest})),
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Counts:
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"].astype(object)
            meta = json.loads(str(z["meta"]))
            pairs = sp.csr_matrix(
                (z["pair_count"], (z["pair_row"], z["pair_col"])),
                shape=(labels.size, labels.size),
                dtype=np.int64,
            )
            return cls(labels, z["label_counts"], pairs, int(meta["n_examples"]), meta["manifest"])


def _counts_from_arrow(
    arrow: pa.Array,
    label_counts: np.ndarray,
    pairs: sp.csr_matrix,
    n_examples: int,
    manifest: dict[str, dict[str, Any]],
) -> Counts:
    """Counts unpickled (:meth:`Counts.__reduce__`): the labels made Python strings again, their Arrow form kept."""
    return Counts(_labels_of(arrow), label_counts, pairs, n_examples, manifest)


def _labels_of(arrow: pa.Array) -> np.ndarray:
    """A vocabulary made in Arrow as Python strings (an object array), its Arrow form kept with it
    (:data:`_ARROW_LABELS`)."""
    labels = arrow.to_numpy(zero_copy_only=False).astype(object, copy=False)
    _ARROW_LABELS.remember(labels, arrow)
    return labels


class _ArrowLabels:
    """The Arrow form (large strings) of the vocabularies made or met in this process, each kept while its
    vocabulary (an object array, never changed once made) lives. Vocabularies are made in Arrow (a count run's,
    :class:`_Vocabulary`; unions, :func:`_sorted_union_arrow`) and are needed in Arrow again: to pickle counts,
    and to unite the vocabularies of counts made in other processes, where converting 669,561 Python strings
    took 32 ms each time (bench/vocabulary_cost.py; docs/performance.md, fifteenth pass)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # id of a vocabulary -> (the vocabulary, weakly; its Arrow form)
        self._arrow: dict[int, tuple[weakref.ref[np.ndarray], pa.Array]] = {}

    def remember(self, labels: np.ndarray, arrow: pa.Array) -> None:
        """``arrow`` is ``labels`` as Arrow large strings."""
        key = id(labels)
        with self._lock:
            entry = self._arrow.get(key)
            if entry is not None and entry[0]() is labels:
                return
            self._arrow[key] = (weakref.ref(labels), arrow)
        # forgotten as the vocabulary is let go, before its id can be reused; not at exit
        weakref.finalize(labels, self._forget, key).atexit = False

    def _forget(self, key: int) -> None:
        with self._lock:
            self._arrow.pop(key, None)

    def get(self, labels: np.ndarray) -> pa.Array:
        """``labels`` as Arrow large strings: the form kept, else converted (and kept)."""
        entry = self._arrow.get(id(labels))
        if entry is not None and entry[0]() is labels:
            return entry[1]
        arrow = pa.array(labels, pa.large_string())
        self.remember(labels, arrow)
        return arrow


_ARROW_LABELS = _ArrowLabels()


def _strictly_sorted(labels: np.ndarray) -> bool:
    """Whether a vocabulary is in sorted order, without repeats (one pass; 0.7 ms at 10^5 labels)."""
    return labels.size < 2 or bool(np.all(labels[1:] > labels[:-1]))


def _same_labels(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two vocabularies are the same, in the same order (the same array, or equal ones: 0.6 ms at 10^5
    labels against about 30 ms to unite them and move one side's indices)."""
    return a is b or (a.size == b.size and bool(np.array_equal(a, b)))


def _sorted_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted union of two vocabularies and where each one's labels land in it. Nothing to unite where they are
    the same sorted one (the usual case within a count: a worker's batches share its run's vocabulary,
    :class:`_RunVocabularies`). The union is one of them, the same array, where that one is sorted and holds the
    other's labels: later merges with counts over it then find their vocabularies the same at once."""
    if _same_labels(a, b) and _strictly_sorted(a):
        same = np.arange(a.size)
        return a, same, same
    for earlier, later in ((a, b), (b, a)):  # versions of one run's vocabulary in this process
        moved = _GROWTH.positions(earlier, later)
        if moved is not None:
            same = np.arange(later.size)
            return (later, moved, same) if earlier is a else (later, same, moved)
    labels, (pos_a, pos_b) = _sorted_union_many([a, b])
    for vocabulary, position in ((b, pos_b), (a, pos_a)):
        if vocabulary.size == labels.size and np.array_equal(position, np.arange(labels.size)):
            return vocabulary, pos_a, pos_b
    return labels, pos_a, pos_b


class _Growth:
    """Where the labels of each version of a run's vocabulary went in the next one (:class:`_Vocabulary`), in this
    process, while the versions live: counts over an earlier version (a batch that ended before the vocabulary
    grew) are moved to a later one by composing these moves, with no label compared or hashed. Uniting two
    vocabularies of 842,676 labels otherwise took 0.3-0.6 s, 22% of a count of 10^7 annotations over them
    (docs/performance.md, fourteenth pass). A version that is let go is spliced out: the versions grown from it
    then come from the one it grew from, their moves composed, or, for a run's first version, from none.

    Every version met, first versions included, is spliced out as it is let go. A first version that was not
    left its children's records naming its id: a later version given that id, let go in turn, composed their
    moves with its own (docs/performance.md, fifteenth pass)."""

    def __init__(self) -> None:
        # Reentrant: a version may be let go (and spliced out) by a thread that holds the lock.
        self._lock = threading.RLock()
        # id of a version -> (id of the version it grew from, that version (weakly), where its labels are in it)
        self._parent: dict[int, tuple[int, weakref.ref[np.ndarray], np.ndarray]] = {}
        self._watched: set[int] = set()  # ids of the live versions that will be spliced out when let go

    def record(self, grown: np.ndarray, earlier: np.ndarray, moved: np.ndarray) -> None:
        """``grown`` was made from ``earlier``, whose labels are at ``moved`` in it."""
        with self._lock:
            self._parent[id(grown)] = (id(earlier), weakref.ref(earlier), moved.astype(index_dtype(grown.size)))
            unwatched = [version for version in (grown, earlier) if id(version) not in self._watched]
            self._watched.update(id(version) for version in unwatched)
        for version in unwatched:
            # run as it is let go, before its id can be reused; not at exit, where nothing is left to unite
            weakref.finalize(version, self._splice, id(version)).atexit = False

    def _splice(self, key: int) -> None:
        with self._lock:
            self._watched.discard(key)
            entry = self._parent.pop(key, None)
            for child, (parent, _, moved) in list(self._parent.items()):
                if parent == key:
                    if entry is None:
                        del self._parent[child]
                    else:
                        self._parent[child] = (entry[0], entry[1], moved[entry[2]])

    def positions(self, earlier: np.ndarray, later: np.ndarray) -> np.ndarray | None:
        """Where the labels of ``earlier`` are in ``later``, if ``later`` grew from it here (None otherwise)."""
        with self._lock:
            moves, version = [], later
            while version is not earlier:
                entry = self._parent.get(id(version))
                version = entry[1]() if entry is not None else None
                if version is None:
                    return None
                moves.append(entry[2])
        if not moves:
            return None
        position = moves.pop()
        while moves:
            position = moves.pop()[position]
        return position.astype(np.int64)


_GROWTH = _Growth()


def _sorted_union_many(vocabularies: Sequence[np.ndarray | pa.Array]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted union of vocabularies (numpy str or Arrow arrays), each without repeats, and where each one's labels
    land in it, in Arrow (Python sets and ``sorted`` took seconds per merge at 10^6 labels). Positions are
    increasing for a sorted vocabulary, so codes sorted within an example stay sorted."""
    arrow, positions = _sorted_union_arrow(vocabularies, repeats=False)
    return _labels_of(arrow), positions


def _sorted_union_arrow(
    vocabularies: Sequence[np.ndarray | pa.Array], *, repeats: bool = True
) -> tuple[pa.Array, list[np.ndarray]]:
    """:func:`_sorted_union_many`, its labels as Arrow large strings: for a caller that needs both forms, so that
    it does not convert the Python strings back.

    The result is the same either way; ``repeats`` says which way is faster. Labels that each vocabulary holds
    once (``repeats=False``: the vocabularies of counts) are sorted all together, and a label met twice is next
    to itself. Arrays that repeat labels (the dictionaries of a run's shards) are made distinct by a hash pass
    first, and only the distinct labels are sorted. Two vocabularies of 669,561 and 670,765 labels took 146 ms
    the first way and 428 ms the second; the dictionaries of 8 of the same corpus's shards, 497 ms and 364 ms
    (bench/vocabulary_cost.py; docs/performance.md, fifteenth pass)."""
    strings = pa.concat_arrays([_arrow_strings(v) for v in vocabularies])
    if repeats:
        both = pc.dictionary_encode(strings)
        distinct = both.dictionary
        order = pc.sort_indices(distinct).to_numpy(zero_copy_only=False)
        rank = np.empty(order.size, np.int64)
        rank[order] = np.arange(order.size)
        position = rank[both.indices.to_numpy(zero_copy_only=False)]
        labels = distinct.take(pa.array(order))
    else:
        order = pc.sort_indices(strings)
        in_order = strings.take(order)
        first = np.ones(len(in_order), bool)  # the first of its run of equal labels
        if len(in_order) > 1:
            later, earlier = in_order.slice(1), in_order.slice(0, len(in_order) - 1)
            first[1:] = pc.not_equal(later, earlier).to_numpy(zero_copy_only=False)
        position = np.empty(len(in_order), np.int64)
        position[order.to_numpy(zero_copy_only=False)] = np.cumsum(first) - 1
        labels = in_order.filter(pa.array(first))
    return labels, np.split(position, np.cumsum([len(v) for v in vocabularies])[:-1])


def _arrow_strings(values: np.ndarray | pa.Array) -> pa.Array:
    if isinstance(values, pa.Array):
        return values.cast(pa.large_string())
    return _ARROW_LABELS.get(values)


def _positions(values: np.ndarray, vocabulary: np.ndarray) -> np.ndarray:
    """Index of each value in ``vocabulary`` (-1 where absent), by hashing in Arrow: fast for 10^6 labels."""
    if values.size == 0:
        return np.empty(0, np.int64)
    found = pc.index_in(pa.array(values.tolist(), pa.string()), value_set=pa.array(vocabulary.tolist(), pa.string()))
    return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), dtype=np.int64)


def _remap_monotone(pairs: sp.csr_matrix, position: np.ndarray, m: int) -> sp.csr_matrix:
    """Move rows and columns to increasing new positions: the CSR structure carries over without a sort."""
    pairs = pairs.tocsr()
    pairs.sum_duplicates()
    dtype = index_dtype(m, pairs.nnz)
    indptr = np.zeros(m + 1, dtype=dtype)
    indptr[position + 1] = np.diff(pairs.indptr)
    np.cumsum(indptr, out=indptr)
    return sp.csr_matrix((pairs.data, position.astype(dtype)[pairs.indices], indptr), shape=(m, m))


def _count_dtype(n_examples: int) -> type:
    """int32 pair counts while they cannot overflow: a pair is counted at most once per example."""
    return index_dtype(n_examples)


def _with_count_type(pairs: sp.csr_matrix, dtype: type) -> sp.csr_matrix:
    """``pairs`` with counts of ``dtype``, sharing the index arrays (no copy if they already are)."""
    if pairs.dtype == dtype:
        return pairs
    return sp.csr_matrix((pairs.data.astype(dtype), pairs.indices, pairs.indptr), shape=pairs.shape)


def _upper_csr(rows: np.ndarray, cols: np.ndarray, data: np.ndarray, m: int) -> sp.csr_matrix:
    """Symmetric pair entries folded into the strict upper triangle, duplicates summed."""
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    mat = sp.csr_matrix((np.asarray(data, np.int64), (lo, hi)), shape=(m, m), dtype=np.int64)
    mat.sum_duplicates()
    return mat


#: Label pairs enumerated at once when counting (4 or 8 bytes each, a few arrays of that size): bounds that part
#: of a count's working memory however many labels its examples have. With 16 MiB batches (:data:`BATCH_BYTES`),
#: a batch of 20 shards over 10^5 labels (12 million pairs) is sorted in 2 blocks, 2 CSR parts, where a batch of
#: half as many shards made 3 with 2^21 pairs, and half as many batches are merged: 2-worker counts of 10^8
#: annotations took 16.9 s and 18.7 s against 18.5 s and 20.4 s with 2^21 pairs and 8 MiB batches, each worker
#: peaking about 80 MiB higher (docs/performance.md, fifteenth pass).
PAIR_BLOCK = 1 << 23
#: Examples with up to this many labels have their pairs enumerated as whole columns: for examples of ``L``
#: labels, one vector operation per position i, for its pairs (i, j), j > i, over all of them. Larger ones (rare,
#: with up to ``L * (L - 1) / 2`` position pairs each) go through :func:`_general_pair_counts`.
SMALL_EXAMPLE = 32
#: Pair matrices of up to this many cells (``m * m``; 4 or 8 bytes each) are summed in a histogram rather than
#: as sparse parts added at the end: twice as fast where labels are few.
DENSE_CELLS = 1 << 22
#: Keys counted at once into the histogram: a smaller block than :data:`PAIR_BLOCK` keeps a count task's
#: working memory down (docs/performance.md, eighth pass). Each block is added to its cells by ``np.add.at`` with
#: an array of ones of the histogram's type (numpy's unbuffered fast path): 4.3 ms a shard at 10^3 labels,
#: against 6.0 ms for sorting the block and adding its distinct keys' counts (fourteenth pass). ``np.bincount``
#: made an int64 copy of the keys and an int64 histogram of all ``m * m`` cells at each call, and was slower
#: (eleventh pass).
DENSE_BLOCK = 1 << 19


def _pairs_in_histogram(m: int) -> bool:
    """Whether pair counts over ``m`` labels are summed in one histogram (:data:`DENSE_CELLS`)."""
    return m * m <= DENSE_CELLS


def upper_pair_counts(
    example_codes: np.ndarray, label_codes: np.ndarray, m: int, *, block: int = PAIR_BLOCK
) -> sp.csr_matrix:
    """Strict upper triangle of ``Y.T @ Y`` for a binary ``Y`` given as distinct (example, label) codes sorted by
    example, then label (:class:`PairCounter`, fed once)."""
    if not example_codes.size or m < 2:
        return sp.csr_matrix((m, m), dtype=np.int64)
    counter = PairCounter(m, max_examples=int(example_codes.max()) + 1, block=block)
    counter.add(example_codes, label_codes)
    return counter.result()


class PairCounter:
    """Strict upper triangle of ``Y.T @ Y``, summed over parts of the examples given one after another.

    A count task feeds it one shard at a time, so that its working memory is one shard's arrays and the counter's,
    not the whole batch's (docs/performance.md, eighth pass). Each example's label pairs (a < b) are enumerated
    directly and counted by their keys ``a * m + b``: half the work of the symmetric sparse product, with no
    diagonal to drop. Examples are taken by size: the examples of ``L`` labels form an ``L x n`` matrix of label
    codes, and the keys of their pairs at positions (i, j > i) are one broadcast addition of row i to the rows after
    it, with no index arithmetic per pair. Keys are counted ``block`` at a time. ``max_examples`` bounds the
    examples of all parts together: pair counts are int32 while it is below 2^31.
    """

    def __init__(self, m: int, *, max_examples: int, block: int = PAIR_BLOCK):
        self.m = m
        self._keys = _KeyCounter(m, block, max_count=max_examples)

    @property
    def narrow(self) -> bool:
        """Whether pair counts are int32 (``max_examples`` below 2^31)."""
        return self._keys.counts is np.int32

    def add_counts(self, pairs: sp.csr_matrix) -> None:
        """Add pair counts already made (strictly upper triangular, over this counter's ``m`` labels)."""
        if pairs.shape != (self.m, self.m):
            raise ValueError(f"pair counts of shape {pairs.shape} added to a counter over {self.m} labels")
        self._keys.add_matrix(pairs)

    def add(self, example_codes: np.ndarray, label_codes: np.ndarray) -> None:
        """Count the pairs of examples given as distinct (example, label) codes sorted by example, then label (an
        example's codes all in this call)."""
        m, counter = self.m, self._keys
        if not example_codes.size or m < 2:
            return
        block = counter.block
        index = index_dtype(example_codes.size)  # per-example bookkeeping in int32 where it fits: 12 bytes less each
        sizes = np.bincount(example_codes).astype(index)
        starts = np.cumsum(sizes, dtype=index) - sizes
        size_class = np.minimum(sizes, SMALL_EXAMPLE + 1).astype(np.uint8)
        by_size = np.argsort(size_class, kind="stable").astype(index)  # a radix sort, for 8-bit values
        bounds = np.searchsorted(size_class[by_size], np.arange(SMALL_EXAMPLE + 2))
        offsets = np.arange(SMALL_EXAMPLE, dtype=index)[:, None]
        for size in range(2, SMALL_EXAMPLE + 1):
            examples = by_size[bounds[size] : bounds[size + 1]]
            per_example = size * (size - 1) // 2
            step = max(1, block // max(per_example, size))  # a chunk's label matrix is at most a block too
            for c in range(0, examples.size, step):
                first = starts[examples[c : c + step]]
                n = first.size
                # row i: the i-th label of each example, all rows gathered at once rather than one by one
                labels = label_codes[offsets[:size] + first].astype(counter.dtype, copy=False)
                scaled = labels * counter.dtype(m)
                keys = counter.reserve(per_example * n)
                at = 0
                for i in range(size - 1):  # the pairs (i, j > i) as one broadcast addition: size - 1 calls
                    after = (size - 1 - i) * n
                    np.add(scaled[i], labels[i + 1 :], out=keys[at : at + after].reshape(size - 1 - i, n))
                    at += after
        if bounds[SMALL_EXAMPLE + 1] < by_size.size:  # some examples have more labels than that
            large = (sizes > SMALL_EXAMPLE)[example_codes]
            counter.add_matrix(_general_pair_counts(example_codes[large], label_codes[large], m, block=block))

    def result(self) -> sp.csr_matrix:
        """The pair counts of every part added (int32 while ``max_examples`` allows it, else int64)."""
        if self.m < 2:
            return sp.csr_matrix((self.m, self.m), dtype=np.int64)
        return self._keys.result()


class _KeyCounter:
    """Counts of pair keys ``a * m + b`` written into a buffer of ``block`` keys, counted each time it fills: added
    to one histogram where ``m * m`` is at most :data:`DENSE_CELLS`, else sorted into sparse parts."""

    def __init__(self, m: int, block: int, max_count: int = 2**63 - 1):
        self.m = m
        self.dtype = index_dtype(m * m)
        self.dense = _pairs_in_histogram(m)
        # a pair is counted at most once per example (max_count of them): int32 cells where that fits, half the memory
        self.counts = _count_dtype(max_count)
        self.histogram = np.zeros(m * m if self.dense else 0, self.counts)
        self.ones = np.empty(0, self.counts)  # what each key adds to its cell (np.add.at)
        self.buffer = np.empty(0, self.dtype)
        self.block = min(block, DENSE_BLOCK) if self.dense else block
        self.filled = 0
        self.parts: list[sp.csr_matrix] = []

    def reserve(self, n: int) -> np.ndarray:
        """Room for ``n`` more keys, to be written by the caller."""
        if self.filled + n > self.buffer.size:
            self._flush()
            if n > self.buffer.size:
                self.buffer = np.empty(max(n, self.block), self.dtype)
        view = self.buffer[self.filled : self.filled + n]
        self.filled += n
        return view

    def _flush(self) -> None:
        keys = self.buffer[: self.filled]
        self.filled = 0
        if not keys.size:
            return
        if self.dense:
            if self.ones.size < keys.size:
                self.ones = np.ones(keys.size, self.counts)
            np.add.at(self.histogram, keys, self.ones[: keys.size])
            return
        keys.sort()
        distinct, counts = _distinct_counts(keys, self.counts)
        self.add_matrix(_keys_to_csr(distinct.astype(np.int64, copy=False), counts, self.m))

    def add_matrix(self, pairs: sp.csr_matrix) -> None:
        self.parts.append(_with_count_type(pairs, self.counts))

    def result(self) -> sp.csr_matrix:
        self._flush()
        if self.dense:
            keys = np.flatnonzero(self.histogram)
            self.parts.append(_keys_to_csr(keys, self.histogram[keys], self.m))
        while len(self.parts) > 1:  # pairwise, so that every part is added about log2(parts) times
            self.parts = [
                (self.parts[i] + self.parts[i + 1]).tocsr() if i + 1 < len(self.parts) else self.parts[i]
                for i in range(0, len(self.parts), 2)
            ]
        return self.parts[0] if self.parts else sp.csr_matrix((self.m, self.m), dtype=self.counts)


def _distinct_counts(sorted_keys: np.ndarray, dtype: type = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of sorted keys and how often each occurs (as ``dtype``). Each step writes into an array
    made for it: concatenating the first flag and appending the end copied the flags and the starts again, and
    ``np.diff`` made int64 counts to cast. With :meth:`PairCounter.add`'s calls per label position, sorting and
    counting a shard's keys took 3.9 ms less of 19 at 10^5 labels (docs/performance.md, seventeenth pass)."""
    n = sorted_keys.size
    if not n:
        return sorted_keys[:0], np.empty(0, dtype)
    first = np.empty(n, bool)
    first[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    del first
    counts = np.empty(starts.size, dtype)
    np.subtract(starts[1:], starts[:-1], out=counts[:-1], casting="unsafe")  # counts are below n, which fits dtype
    counts[-1] = n - starts[-1]
    return sorted_keys[starts], counts


def _keys_to_csr(keys: np.ndarray, counts: np.ndarray, m: int) -> sp.csr_matrix:
    """CSR of sorted distinct keys ``a * m + b`` and their counts."""
    dtype = index_dtype(m, keys.size)
    rows, columns = np.divmod(keys, m)  # one division for both
    indptr = np.zeros(m + 1, dtype)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    return sp.csr_matrix((counts, columns.astype(dtype, copy=False), indptr), shape=(m, m))


def _general_pair_counts(
    example_codes: np.ndarray, label_codes: np.ndarray, m: int, *, block: int = PAIR_BLOCK
) -> sp.csr_matrix:
    """:func:`upper_pair_counts` for examples of any size (used for those above :data:`SMALL_EXAMPLE`).

    Each example's label pairs (a < b) are enumerated directly and counted by sorting their keys ``a * m + b``.
    The sorted keys are the CSR structure itself. Pairs are enumerated in blocks
    of about ``block`` by ranges of the first label ``a``, so blocks hold disjoint keys and their sorted results
    simply follow one another (one label's pairs are never split, so a block can exceed ``block`` by them).
    """
    nnz = example_codes.size
    if not nnz:
        return sp.csr_matrix((m, m), dtype=np.int64)
    idx = index_dtype(nnz)
    ends = np.cumsum(np.bincount(example_codes))
    after = (ends[example_codes] - np.arange(1, nnz + 1)).astype(idx)  # labels after this one in its example
    del ends
    cumulative = np.cumsum(np.bincount(label_codes, weights=after, minlength=m))  # pairs by first label
    total = int(cumulative[-1])
    cuts = np.searchsorted(cumulative, np.arange(block, total, block), side="right")
    edges = np.unique(np.concatenate(([0], cuts, [m])))
    keys, counts = [], []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        if lo == 0 and hi == m:
            first = None
        else:
            first = np.flatnonzero((label_codes >= lo) & (label_codes < hi)).astype(idx)
        k, c = _count_keys(label_codes, after, m, first)
        keys.append(k)
        counts.append(c)
    uniq = np.concatenate(keys) if len(keys) > 1 else keys[0]
    data = np.concatenate(counts) if len(counts) > 1 else counts[0]
    return _keys_to_csr(uniq, data, m)  # m >= 1: there are codes below it


def _count_keys(
    labels: np.ndarray, after: np.ndarray, m: int, first: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pair keys ``a * m + b`` (sorted) and their counts, for the annotations ``first`` (all if None),
    each paired with the ``after`` annotations that follow it in its example.

    About 20 bytes per pair in the arrays it allocates (48 before): positions in int32, and the second annotation
    of each pair built by a running sum (``first + 1 .. first + after``) rather than from arrays of offsets.
    """
    idx = index_dtype(labels.size)
    first = np.arange(labels.size, dtype=idx) if first is None else first
    repeats = after[first]
    first, repeats = first[repeats > 0], repeats[repeats > 0]
    if not first.size:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    second = np.ones(int(repeats.sum()), idx)
    second[0] = first[0] + 1
    second[np.cumsum(repeats[:-1])] = first[1:] + 1 - (first[:-1] + repeats[:-1])  # each run's start
    np.cumsum(second, out=second)
    keys = np.repeat(labels[first].astype(np.int64) * m, repeats)
    del first, repeats
    keys += labels[second]
    del second
    keys.sort()
    return _distinct_counts(keys)


def counts_from_annotations(ann: Annotations) -> Counts:
    """Counts of one validated shard: label counts, and pair counts (the strict upper triangle of ``Y.T @ Y``)."""
    return counts_from_batch([ann])


def counts_from_batch(anns: Sequence[Annotations]) -> Counts:
    """Counts of several validated shards at once: their vocabularies united once and their pairs counted in one
    pass, which costs far less than counting each and merging (no per-shard vocabulary union or sparse sum)."""
    codes = [_as_codes(a) for a in anns]
    vocabulary = _Vocabulary()
    if codes:  # all in memory already: their labels united at once, so the vocabulary never grows while counting
        vocabulary.locate([c.dictionary for c in codes])
    return _count_consumed(codes, vocabulary)


def _as_codes(ann: Annotations) -> ShardCodes:
    """A shard read in its own sorted vocabulary, as codes into that vocabulary (a dictionary like any other)."""
    return ShardCodes(
        path=ann.path,
        sha256=ann.sha256,
        dictionary=ann.labels,
        example_codes=ann.example_codes,
        entry_codes=ann.label_codes,
        n_examples=ann.n_examples,
        n_rows=ann.n_rows,
        example_ids=ann.example_ids,
    )


class _Vocabulary:
    """Labels met so far, sorted, and where a dictionary's labels are in them: a count task looks its shards' labels
    up (one hash pass, for one shard or, over many labels, several: :data:`LOOKUP_ALONE_LABELS`); the vocabulary
    grows only when a shard brings labels it lacks, which are put where they belong (:meth:`_grow`), and each
    version records where the previous one's labels went (:class:`_Growth`).

    Shared by a count run's tasks in a process (:class:`_RunVocabularies`), a task's counts are over the whole
    vocabulary, so that the counts of a run's tasks on one worker share it: merging them unites no vocabularies
    and moves no indices (at 10^5 labels, uniting and sorting took a fifth of a count; docs/performance.md, ninth
    pass). Counts over labels a batch does not use are the same counts: those labels have no pairs and zero
    counts, and every label of a run's vocabulary is used by some shard of the run, so the sum over the run has no
    others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (labels, the same as Arrow strings), replaced together: tasks in other threads read it without the lock
        self._known: tuple[np.ndarray, pa.Array] | None = None

    @property
    def labels(self) -> np.ndarray:
        known = self._known
        return known[0] if known is not None else np.empty(0, dtype=object)

    def lookup(self, strings: pa.Array) -> tuple[tuple[np.ndarray, pa.Array] | None, np.ndarray]:
        """The vocabulary as it is now (None while empty) and where each of ``strings`` (Arrow large strings) is
        in it, -1 where absent: one hash pass over the vocabulary (Arrow's ``index_in`` builds its table at every
        call)."""
        known = self._known
        if known is None:
            return None, np.full(len(strings), -1, np.int64)
        found = pc.index_in(strings, value_set=known[1])
        if found.null_count:
            found = pc.fill_null(found, -1)
        return known, found.to_numpy(zero_copy_only=False).astype(np.int64)

    def find(self, dictionary: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
        """The labels and where the dictionary's labels are in them, or None if it has labels they lack."""
        known, found = self.lookup(_arrow_strings(dictionary))
        return (known[0], found) if known is not None and not (found < 0).any() else None

    def locate(self, dictionaries: Sequence[pa.Array]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The labels (object array, sorted; the same array until it grows), grown by those of ``dictionaries``
        it lacked, and where each dictionary's labels are in them."""
        strings = pa.concat_arrays([_arrow_strings(d) for d in dictionaries])
        cuts = np.cumsum([len(d) for d in dictionaries])[:-1]
        known, found = self.lookup(strings)
        if known is None or (found < 0).any():
            with self._lock:  # tasks of one run in threads of one worker: the vocabulary grows one task at a time
                if self._known is not known:  # another task grew it meanwhile
                    known, found = self.lookup(strings)
                if known is None or (found < 0).any():
                    known, found = self._grow(known, strings, found)
        return known[0], np.split(found, cuts)

    def _grow(
        self, known: tuple[np.ndarray, pa.Array] | None, strings: pa.Array, found: np.ndarray
    ) -> tuple[tuple[np.ndarray, pa.Array], np.ndarray]:
        """Add the ``strings`` not ``found`` (-1) in the ``known`` vocabulary to it: the grown vocabulary and
        where each of ``strings`` is in it. Few new labels are merged into the sorted labels where they belong
        (:func:`_insert_sorted`); the vocabulary is sorted again only when it is empty or grows by more than a
        :data:`GROW_BY_SORTING` share of its size."""
        missing = strings.filter(pa.array(found < 0))
        new = pc.unique(missing)
        if known is None or len(new) > GROW_BY_SORTING * known[0].size:
            before = [known[1]] if known is not None else []
            arrow, positions = _sorted_union_arrow([*before, strings])
            labels = _labels_of(arrow)
            if known is not None:
                _GROWTH.record(labels, known[0], positions[0])
            self._known = (labels, arrow)
            return self._known, positions[-1]
        new = new.take(pc.sort_indices(new))
        labels, arrow, old_at, new_at = _insert_sorted(known[0], known[1], new)
        position = np.empty(found.size, np.int64)
        hit = found >= 0
        position[hit] = old_at[found[hit]]
        position[~hit] = new_at[pc.index_in(missing, value_set=new).to_numpy(zero_copy_only=False)]
        _GROWTH.record(labels, known[0], old_at)
        _ARROW_LABELS.remember(labels, arrow)
        self._known = (labels, arrow)
        return self._known, position


#: A vocabulary that grows by more than this share of its labels at once is sorted again whole; fewer new labels
#: are put where they belong by binary search (:func:`_insert_sorted`). Sorting again whole each time took 2.0 s
#: of a count of 10^7 annotations over 842,676 labels, against 1.1-1.2 s so, and inserting was no slower even
#: where the new labels outnumbered the old (docs/performance.md, fourteenth pass).
GROW_BY_SORTING = 1.0


def _insert_sorted(
    labels: np.ndarray, strings: pa.Array, new: pa.Array
) -> tuple[np.ndarray, pa.Array, np.ndarray, np.ndarray]:
    """Sorted, distinct ``labels`` (object array; ``strings`` the same in Arrow) with the sorted, distinct
    labels ``new`` (none of them in ``labels``) merged in: the merged labels both ways, where each old label went
    and where each new one went. A binary search per new label (Python comparisons, which order ``str`` by code
    point as Arrow's sort orders UTF-8 by byte: the same order), then moves of the old labels as a whole."""
    added = new.to_numpy(zero_copy_only=False).astype(object)
    n, k = labels.size, added.size
    new_at = np.searchsorted(labels, added) + np.arange(k)
    is_new = np.zeros(n + k, bool)
    is_new[new_at] = True
    old_at = np.flatnonzero(~is_new)
    merged = np.empty(n + k, object)
    merged[old_at] = labels
    merged[new_at] = added
    order = np.empty(n + k, np.int64)
    order[old_at] = np.arange(n)
    order[new_at] = n + np.arange(k)
    merged_strings = pa.concat_arrays([strings, new.cast(pa.large_string())]).take(pa.array(order))
    return merged, merged_strings, old_at, new_at


class _RunVocabularies:
    """One :class:`_Vocabulary` per count run in this process, for a few runs at a time."""

    #: Runs remembered at once (least recently used forgotten first): a run forgets its own when it ends
    #: (:func:`_forget_run_vocabulary`); this bounds what runs that ended without doing so leave behind.
    KEEP = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, _Vocabulary] = OrderedDict()

    def get(self, run: str) -> _Vocabulary:
        with self._lock:
            vocabulary = self._runs.get(run)
            if vocabulary is None:
                vocabulary = self._runs[run] = _Vocabulary()
            self._runs.move_to_end(run)
            while len(self._runs) > self.KEEP:
                self._runs.popitem(last=False)
            return vocabulary

    def forget(self, run: str) -> None:
        with self._lock:
            self._runs.pop(run, None)


_RUN_VOCABULARIES = _RunVocabularies()


def _forget_run_vocabulary(run: str) -> None:
    """Drop a run's vocabulary from this process and hand its freed heap back (run on every worker when a count's
    tasks are done: where batches do not, :func:`count_batch`)."""
    _RUN_VOCABULARIES.forget(run)
    _release_free_heap()


#: Examples a batch's int32 pair counts can hold (a pair is counted at most once per example).
_INT32_EXAMPLES = 2**31 - 2


class _BatchCount:
    """A batch's counts, shard by shard, over a vocabulary that may grow meanwhile: what was counted over an
    earlier vocabulary is put aside as it is and moved to the last one once, at the end (an order-preserving move:
    both are sorted, and the later holds the earlier)."""

    def __init__(self) -> None:
        self.labels: np.ndarray | None = None
        self.counter: PairCounter | None = None
        self.label_counts = np.empty(0, np.int64)
        self.earlier: list[tuple[np.ndarray, np.ndarray, sp.csr_matrix]] = []
        self.n_examples = 0
        self.manifest: dict[str, dict[str, Any]] = {}

    def add(self, shard: ShardCodes, used: np.ndarray, labels: np.ndarray, position: np.ndarray) -> None:
        """Count a shard whose used dictionary entries ``used`` are the labels at ``position`` in ``labels``."""
        wide = self.n_examples + shard.n_examples > _INT32_EXAMPLES  # int32 pair counts would overflow
        if labels is not self.labels or (wide and self.counter.narrow):
            if self.counter is not None:
                self.earlier.append((self.labels, self.label_counts, self.counter.result()))
            self.labels = labels
            self.counter = PairCounter(labels.size, max_examples=2**63 - 1 if wide else _INT32_EXAMPLES)
            self.label_counts = np.zeros(labels.size, np.int64)
        m = labels.size
        rank = np.zeros(len(shard.dictionary), index_dtype(m))
        rank[used] = position
        # Pairs are within an example, so each shard is counted on its own codes, into the batch's vocabulary.
        examples, codes = distinct_pairs(shard.example_codes, rank[shard.entry_codes], m)
        self.label_counts += np.bincount(codes, minlength=m)
        self.counter.add(examples, codes)
        self.n_examples += shard.n_examples
        self.manifest[shard.sha256] = {
            "path": str(shard.path),
            "n_examples": shard.n_examples,
            "n_annotations": int(codes.size),
            "n_rows": shard.n_rows,
        }

    def result(self, order: Sequence[str]) -> Counts:
        """The batch's counts, its manifest in the shards' ``order`` (content hashes)."""
        if self.counter is None:
            return Counts.empty()
        labels, label_counts, counter = self.labels, self.label_counts, self.counter
        for old_labels, old_label_counts, old_pairs in self.earlier:
            _, where, _ = _sorted_union(old_labels, labels)
            label_counts[where] += old_label_counts
            counter.add_counts(_remap_monotone(old_pairs, where, labels.size))
        self.earlier = []
        manifest = {sha: self.manifest[sha] for sha in order}
        return Counts(labels, label_counts, counter.result(), self.n_examples, manifest)


def _count_consumed(shards: Iterable[ShardCodes], vocabulary: _Vocabulary | None = None) -> Counts:
    """Counts of shards as read (:func:`~pmi_pipeline.shards.read_shard_codes`), over ``vocabulary`` (a run's,
    :class:`_Vocabulary`; a new one if None), taking each shard from ``shards`` as it goes (a generator that reads
    them, or a list, which it empties).

    A shard whose labels the vocabulary holds is counted into the batch's counter at once and let go, so that
    while the vocabulary does not grow (a run's tasks, once its labels are met) a task holds one shard's codes
    however many its batch has: 9 shards held at once took 40 MiB against 21 MiB for one at 10^3 labels, and
    larger batches, with fewer merges, are faster (docs/performance.md, tenth pass). A shard with labels it lacks
    waits, and the vocabulary grows once for the waiting shards (up to :data:`WAITING_SHARDS` of them), then they
    are counted: growing it for each shard (a sort of the vocabulary each time, and the counts so far moved to
    it) was slower at 10^5 labels. Over more than :data:`LOOKUP_ALONE_LABELS` labels every shard waits, so that
    one lookup serves them all: 2-worker counts at 10^5 labels took 17.6 s so, against 22.7 s with a lookup per
    shard (docs/performance.md, thirteenth pass)."""
    vocabulary = vocabulary if vocabulary is not None else _Vocabulary()
    if isinstance(shards, list):
        shards = _consume(shards)
    batch = _BatchCount()
    waiting: list[tuple[ShardCodes, np.ndarray, pa.Array]] = []  # shards with labels the vocabulary lacks
    order: list[str] = []
    for shard in shards:
        if shard.sha256 in order:
            raise ValueError(f"shard(s) counted twice: {[shard.sha256]}")
        order.append(shard.sha256)
        used = np.flatnonzero(np.bincount(shard.entry_codes, minlength=len(shard.dictionary)))
        # A row group's dictionary usually holds only the labels it uses: then it is looked up as it is
        dictionary = shard.dictionary if used.size == len(shard.dictionary) else shard.dictionary.take(pa.array(used))
        found = vocabulary.find(dictionary) if vocabulary.labels.size <= LOOKUP_ALONE_LABELS else None
        if found is None:
            waiting.append((shard, used, dictionary))
        else:
            batch.add(shard, used, *found)
        del shard, dictionary
        if len(waiting) == WAITING_SHARDS:
            _count_waiting(batch, vocabulary, waiting)
    _count_waiting(batch, vocabulary, waiting)
    return batch.result(order)


#: Shards waiting to be looked up (with labels the vocabulary lacks, or over more than
#: :data:`LOOKUP_ALONE_LABELS` labels) that a count task holds at most before it looks them up: bounds what a
#: task holds (about 4 MiB of Parquet) however large its batch is.
WAITING_SHARDS = 8
#: Vocabularies of up to this many labels are looked up shard by shard, so that a task holds one shard. Larger ones
#: are looked up for up to :data:`WAITING_SHARDS` shards at once: each lookup hashes the whole vocabulary (Arrow's
#: ``index_in`` builds its table at every call), 10.4-10.7 ms of the 12.1-12.5 ms that looking up one shard's
#: 53,000 labels takes at 10^5 labels, against 5.1-5.5 ms a shard for 8 at once (bench/label_lookup.py;
#: docs/performance.md, thirteenth pass).
LOOKUP_ALONE_LABELS = 1 << 12


def _count_waiting(
    batch: _BatchCount, vocabulary: _Vocabulary, waiting: list[tuple[ShardCodes, np.ndarray, pa.Array]]
) -> None:
    """Look the waiting shards' labels up at once, growing the vocabulary if they bring new ones, count the shards
    and let them go (empties ``waiting``)."""
    if not waiting:
        return
    labels, positions = vocabulary.locate([dictionary for _, _, dictionary in waiting])
    for position in positions:
        shard, used, _ = waiting.pop(0)
        batch.add(shard, used, labels, position)
        del shard


def _consume(shards: list[ShardCodes]) -> Iterator[ShardCodes]:
    """The shards of a list, each removed from it as it is handed out, so that a caller who hands over its only
    references frees each shard once it is counted."""
    while shards:
        yield shards.pop(0)


def count_shard(path: str | Path, expected_sha256: str | None = None) -> Counts:
    """Validate and count one shard, in its own sorted vocabulary (so the result is cacheable by content hash)."""
    return counts_from_annotations(read_annotations(path, expected_sha256=expected_sha256))


def count_shard_with_ids(path: str | Path, expected_sha256: str | None = None) -> tuple[Counts, np.ndarray]:
    """:func:`count_shard` and the shard's example-id fingerprints (sorted uint64), for the repeat check."""
    ann = read_annotations(path, expected_sha256=expected_sha256)
    return counts_from_annotations(ann), ann.example_ids


#: Outcome of one shard of a batch: its content hash and example-id fingerprints (or where the task wrote them),
#: or why it was rejected.
ShardOutcome = tuple[str, np.ndarray | StoredFingerprints] | ShardError


def count_batch(
    paths: Sequence[str | Path],
    expected_hashes: Sequence[str | None] | None = None,
    *,
    run: str | None = None,
    fingerprints_to: str | None = None,
) -> tuple[Counts, list[ShardOutcome]]:
    """Validate several shards and count the valid ones as one, reading each as it is counted
    (:func:`_count_consumed`; with a ``run``, over that count run's vocabulary in this process,
    :class:`_RunVocabularies`).

    Each shard is validated on its own: a bad one is returned as its :class:`ShardError` (returned, not raised,
    so that it costs neither the other shards of the batch nor the other tasks) and contributes nothing. A valid
    one's fingerprints are written to a file in ``fingerprints_to`` as it is read, where this process can reach
    that directory (:class:`~pmi_pipeline.example_ids.FingerprintWriter`), else returned with its outcome.
    """
    expected = list(expected_hashes) if expected_hashes is not None else [None] * len(paths)
    outcomes: list[ShardOutcome] = []
    # A worker on another machine does not see the client's directory (a random name made for this count).
    writer = FingerprintWriter(fingerprints_to) if fingerprints_to and os.path.isdir(fingerprints_to) else None

    def fingerprints(ids: np.ndarray) -> np.ndarray | StoredFingerprints:
        nonlocal writer
        if writer is not None:
            try:
                return writer.write(ids)
            except OSError as exc:  # not ours to write to (another user's worker), or a full disk: send them
                log.warning("cannot write example-id fingerprints to %s (%s): sending them instead", writer.path, exc)
                writer.close()
                writer = None
        return ids

    def read() -> Iterator[ShardCodes]:
        for path, sha in zip(paths, expected, strict=True):
            try:
                shard = read_shard_codes(path, expected_sha256=sha)
            except ShardError as exc:
                outcomes.append(exc)
                continue
            outcomes.append((shard.sha256, fingerprints(shard.example_ids)))
            yield shard
            del shard  # counted: the next shard is read without it

    vocabulary = _RUN_VOCABULARIES.get(run) if run is not None else None
    try:
        counts = _count_consumed(read(), vocabulary)  # one shard read and held at a time
    finally:
        if writer is not None:
            writer.close()
    if _pairs_in_histogram(counts.n_labels):
        _release_free_heap()
    return counts, outcomes


def _release_free_heap() -> None:
    """Hand the heap pages a batch freed back to the OS (glibc's ``malloc_trim``): otherwise a worker's RSS creeps
    up batch after batch as the heap fragments, as Dask's docs on unreleased worker memory describe. No-op
    without glibc.

    :func:`count_batch` does so after each batch only where pair counts go into a histogram (up to
    :data:`DENSE_CELLS` cells): there a batch's working memory is a few MiB, and a worker's RSS is flat only so
    (10^8 annotations over 10^3 labels: +18% from 10^6 with it, +22% without). Over more labels, what a batch
    frees is what the next batch needs again: at 10^5 labels, 20 batches faulted 624-699 MiB in with the trim
    and 201-218 MiB without, 2-10% of their time (bench/heap_trim.py, twelfth pass); there the heap is handed
    back once, when the run's tasks are done."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


#: Parquet bytes one count task reads at most: the shards of a batch share one vocabulary and one pass over their
#: pairs, so the costs of a task and of a merge are paid per batch, not per shard. A task holds one shard at a
#: time once its run's vocabulary holds its labels (:func:`_count_consumed`; up to :data:`WAITING_SHARDS` over
#: more than :data:`LOOKUP_ALONE_LABELS` labels), so what grows with the batch is
#: its counter's pairs (at 10^5 labels) and its shards' example-id fingerprints (8 bytes per example). 8 MiB
#: against 4: 11% faster at 10^3 labels, as fast at 10^5 (tenth pass). 16 MiB against 8, with a
#: :data:`PAIR_BLOCK` of 2^23 pairs: 13% faster at 10^3 labels with the same worker peaks, 8-9% faster at 10^5
#: labels; 16 MiB alone was as fast at 10^5 labels (docs/performance.md, fifteenth pass).
BATCH_BYTES = 16 << 20
#: Batches per worker thread at least, while there are shards enough, so that every worker stays busy to the end.
BATCHES_PER_SLOT = 4


def plan_batches(sizes: Sequence[int], slots: int = 1, max_bytes: int = BATCH_BYTES) -> list[range]:
    """Consecutive runs of shards (by their sizes in bytes) to count one task each: up to ``max_bytes``, and
    smaller while that leaves fewer than :data:`BATCHES_PER_SLOT` batches per worker thread (``slots``)."""
    target = min(max_bytes, sum(sizes) / max(1, BATCHES_PER_SLOT * slots))
    batches: list[range] = []
    start, filled = 0, 0
    for i, size in enumerate(sizes):
        if i > start and filled + size > target:
            batches.append(range(start, i))
            start, filled = i, 0
        filled += size
    if start < len(sizes):
        batches.append(range(start, len(sizes)))
    return batches


def _first(pair: tuple[Counts, Any]) -> Counts:
    return pair[0]


def _second(pair: tuple[Counts, Any]) -> Any:
    return pair[1]


def _merge_pair(a: Counts, b: Counts) -> Counts:
    return a.merge(b, sorted_union=True)


@dataclass
class CountResult:
    counts: Counts  # in sorted vocabulary order
    rejected: list[ShardError]
    seconds: float
    # content hash -> example-id fingerprints of the counted shards (FingerprintFiles: read from disk when used)
    example_ids: Mapping[str, np.ndarray] = field(default_factory=dict)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0  # a missing file is reported by its count task, with its name


def repeat_error(path: str | Path, repeat: Repeat, other: str) -> ShardError:
    """The error for a shard that repeats an earlier shard's example: names the first repeated id's row."""
    ids = pq.read_table(path, columns=[ID_COLUMN]).column(ID_COLUMN).combine_chunks()
    rows = np.flatnonzero(hash_example_ids(ids) == np.uint64(repeat.fingerprint))
    row = int(rows[0]) if rows.size else None
    shown = repr(ids[row].as_py()) if row is not None else f"fingerprint {repeat.fingerprint:#x}"
    more = f" ({repeat.n_repeated} repeated ids in all)" if repeat.n_repeated > 1 else ""
    return ShardError(
        path,
        f"example id {shown} is already counted from {other}{more}: an example's annotations must live in one "
        "shard, so this shard is not counted",
        row=row,
        column=ID_COLUMN,
    )


def count_shards(
    paths: Sequence[str | Path],
    client: Client | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    expected_hashes: Sequence[str] | None = None,
    index: ExampleIndex | None = None,
    names: dict[str, str] | None = None,
    check_repeats: bool = True,
    batch_bytes: int = BATCH_BYTES,
) -> CountResult:
    """Count shards and sum them. Bad shards are collected in ``rejected`` and contribute nothing.

    Consecutive shards are counted in batches (:func:`plan_batches`, :func:`count_batch`): with a Dask ``client``
    each batch is a task, and batches are summed as they finish by merge tasks on the workers (a binary counter:
    at most one partial sum per size class waits), so worker memory holds a few partial sums and never every
    batch's counts. Each worker sums the batches it counted (:class:`_WorkerSums`); the last merges are split
    by label range, one range of each worker's sum per worker, so that partial sums move between workers only
    there, and only the rows of the other workers' ranges. Only the final counts (one range at a time) travel
    back, and the example-id fingerprints (8 bytes per example) where the workers cannot write them where this
    process reads them (:class:`~pmi_pipeline.example_ids.FingerprintWriter`). Without a client, batches are
    counted and summed one after another in this process. ``progress(done, total)`` is called as shards finish.
    ``batch_bytes`` caps the Parquet bytes of a batch, and so a task's memory.

    ``expected_hashes`` (one per path: the hash it was listed with) rejects a shard that changed since. A shard
    that repeats an example id of ``index`` (the store's counted examples) or of an earlier path is rejected too;
    ``names`` maps the index's shard hashes to paths for that message. Repeats are found once every shard is
    counted; in that (exceptional) case the shards that remain are summed again without the rejected ones.
    """
    start = time.perf_counter()
    paths = [str(p) for p in paths]
    expected = list(expected_hashes) if expected_hashes is not None else [None] * len(paths)
    total = len(paths)
    slots = sum(client.nthreads().values()) if client is not None else 1
    batches = plan_batches([_size(p) for p in paths], slots, batch_bytes)
    rejected: list[ShardError] = []
    fingerprints = FingerprintFiles()  # on disk as they arrive: memory stays flat however many examples
    digests: dict[int, str] = {}
    sums = _WorkerSums(client)
    done = 0
    # Unique to this run: its task keys (two runs sharing a scheduler must never receive each other's results) and
    # its vocabulary in each worker (_RunVocabularies).
    run = uuid.uuid4().hex[:12]

    def finished(batch: range, outcomes: list[ShardOutcome]) -> None:
        nonlocal done
        for i, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, ShardError):
                rejected.append(outcome)
            else:
                digests[i] = outcome[0]
                fingerprints.add(*outcome)
            done += 1
            fault_point("count:shard-done")
            if progress:
                progress(done, total)
        fingerprints.release(o[1] for o in outcomes if not isinstance(o, ShardError))

    warn_if_sorting_slowly()  # the count tasks' sorts without a client, the check for repeats' with one
    if client is None:
        try:
            for batch in batches:
                counts, outcomes = count_batch(
                    [paths[i] for i in batch],
                    [expected[i] for i in batch],
                    run=run,
                    fingerprints_to=fingerprints.directory,
                )
                if counts.manifest:
                    sums.add(counts, None)
                finished(batch, outcomes)
        finally:
            _forget_run_vocabulary(run)
    else:
        from distributed import as_completed

        futures = [
            client.submit(
                count_batch,
                [paths[i] for i in batch],
                [expected[i] for i in batch],
                run=run,
                fingerprints_to=fingerprints.directory,
                pure=False,
                key=f"count-batch-{run}-{b}",
            )
            for b, batch in enumerate(batches)
        ]
        batch_of = {f.key: batches[b] for b, f in enumerate(futures)}
        outcome_of: dict[str, range] = {}
        pending = as_completed(futures, loop=client.loop)  # not Dask's default client's loop: there may be none
        for future in pending:
            error = future.exception()
            if error is not None:
                raise error
            if future.key in outcome_of:
                finished(outcome_of.pop(future.key), future.result())
                continue
            # A batch is done. Only its outcomes (errors, content hashes, fingerprints: 8 bytes per example) travel
            # here; its counts stay on the workers, in the merge tasks that use them. Nothing waits here: the
            # outcomes are taken as they come, so merges are submitted as soon as a batch is done. The merges go
            # before any waiting count task (priority 1): otherwise a worker runs every waiting count task before
            # them, and holds every batch's counts until the end. These two small tasks go before any waiting merge
            # (priority 2): the last merges are submitted once every batch's outcomes are here, and outcomes queued
            # behind a worker's merges would hold them back (docs/performance.md, sixteenth pass).
            outcomes = client.submit(_second, future, pure=False, priority=2)
            outcome_of[outcomes.key] = batch_of[future.key]
            pending.add(outcomes)
            worker = _holder(client, future)
            sums.add(client.submit(_first, future, pure=False, priority=2, **_near(worker)), worker)
            future.release()
        del futures
    fingerprints.close_directory()  # every count task is done
    total = sums.total()  # the last merges run on the workers while this process checks for repeats below

    counts = None
    if check_repeats:
        # Example ids repeated across shards: decided in the paths' order, so the outcome never depends on timing.
        order = sorted(digests)
        position = {digests[i]: i for i in order}
        repeats = find_repeats(index or ExampleIndex.empty(), fingerprints, order=[digests[i] for i in order])
        if repeats:
            names = names or {}
            for repeat in repeats:
                i = position[repeat.shard]
                other = paths[position[repeat.other]] if repeat.other in position else names.get(repeat.other)
                rejected.append(repeat_error(paths[i], repeat, f"shard {other or repeat.other}"))
            dropped = {position[r.shard] for r in repeats}
            kept = [i for i in order if i not in dropped]
            del total  # the sum that includes them
            log.warning("%d shard(s) repeat example ids: summing the other %d again", len(dropped), len(kept))
            again = count_shards(
                [paths[i] for i in kept],
                client,
                expected_hashes=[expected[i] for i in kept],
                check_repeats=False,
                batch_bytes=batch_bytes,
            )
            rejected.extend(again.rejected)
            counts = again.counts
            # only what was counted again (a shard may have changed since) goes into the example-id index
            for digest in [d for d in fingerprints if d not in counts.manifest]:
                fingerprints.discard(digest)
    if counts is None:
        counts = _wait(total)
        del total
    if client is not None:
        # Every task of the run is done: the workers forget its vocabulary and hand their freed heap back (not
        # while they merge, which would fault it in again). After an error, they forget it as other runs come.
        client.run(_forget_run_vocabulary, run, on_error="ignore")
    rejected.sort(key=lambda e: str(e.path))
    fault_point("count:merged")
    return CountResult(counts.sorted().widened(), rejected, time.perf_counter() - start, fingerprints)


class _RunningSum:
    """Sum counts as they arrive, as a binary counter: a partial sum of 2^k shards waits only for another of the
    same size, so at most one per size class is held (log2 of the shard count), and merges stay balanced.

    With a ``client``, merges are tasks, run on ``worker`` (an address) while it lives, else anywhere."""

    def __init__(
        self, client: Client | None, worker: str | None = None, merge: Callable[[Counts, Counts], Counts] | None = None
    ):
        self.client = client
        self.worker = worker
        self.merge = merge or _merge_pair
        self.stack: list[tuple[int, Any]] = []  # (size class, Counts or a future of Counts)

    def _merge(self, a: Any, b: Any) -> Any:
        if self.client is None:
            return self.merge(a, b)
        # Before any waiting count task: a partial sum is merged as soon as its partner exists, not at the end.
        return self.client.submit(self.merge, a, b, pure=False, priority=1, **_near(self.worker))

    def add(self, counts: Any) -> None:
        level = 0
        if self.client is None:
            counts = counts.sorted()
        while self.stack and self.stack[-1][0] == level:
            _, previous = self.stack.pop()
            counts = self._merge(previous, counts)
            level += 1
        self.stack.append((level, counts))

    def total(self) -> Any:
        """The sum of everything added: Counts (empty if nothing was), or with a client a future of them (not
        waited for)."""
        if not self.stack:
            return Counts.empty()
        total = self.stack.pop()[1]
        while self.stack:
            total = self._merge(self.stack.pop()[1], total)
        return total

    def result(self) -> Counts:
        return _wait(self.total())


class _WorkerSums:
    """One :class:`_RunningSum` per worker, fed the batches that worker counted, its merges pinned to it: a
    partial sum stays where it was made. With one running sum for the cluster, merges fetched partial sums from
    other workers (5.8 s of transfers in a 40 s count of 10^8 annotations over 10^5 labels; 1.9 s so, in
    docs/performance.md) and most merging fell to one worker; here each worker folds its own.

    The last merges are tiled by label range (:func:`_tiled_total`): with several workers, each worker's sum is
    cut into one row range per worker and each range is summed on its own worker, so that no worker merges the
    whole sum while the others wait."""

    def __init__(self, client: Client | None):
        self.client = client
        self.sums: dict[str | None, _RunningSum] = {}

    def add(self, counts: Any, worker: str | None) -> None:
        if worker not in self.sums:
            self.sums[worker] = _RunningSum(self.client, worker)
        self.sums[worker].add(counts)

    def total(self) -> Any:
        """The sum over every worker: Counts (empty if nothing was added), or with a client a future of them or
        :class:`_Tiles` (not waited for)."""
        if self.client is not None and len(self.sums) > 1:
            return _tiled_total(self.client, self.sums)
        totals = [running.total() for running in self.sums.values()]
        return totals[0] if totals else Counts.empty()


def _tiled_total(client: Client, sums: Mapping[str | None, _RunningSum]) -> _Tiles:
    """Each worker's sum (its partial sums merged on it) cut into one label range of rows per worker, each range
    summed on its worker (a :class:`_RunningSum` of its own there). The cuts come from one worker's sum, as labels
    that split its pairs evenly; a task works them out on that worker.

    Cutting every partial sum each worker still held, and summing each range's pieces there, merged more: the
    same counts took 9.64 s against 9.11 s so at 10^5 labels (docs/performance.md, eleventh pass)."""
    totals = {worker: running.total() for worker, running in sums.items()}
    first = next(iter(totals))
    cuts = client.submit(_row_cuts, totals[first], len(totals), pure=False, priority=1, **_near(first))
    tiles = []
    for r, worker in enumerate(totals):
        running = _RunningSum(client, worker, merge=_merge_tile)
        for where, total in totals.items():
            running.add(client.submit(_tile, total, cuts, r, pure=False, priority=1, **_near(where)))
        tiles.append(running.total())
    return _Tiles(tiles, cuts)


def _row_cuts(counts: Counts, n: int) -> list[str]:
    """``n - 1`` labels that cut the rows of ``counts`` (in sorted vocabulary order) into ``n`` ranges holding
    about equal numbers of pairs: range r is the rows whose labels sort at or after cut r - 1 and before cut r."""
    if not counts.n_labels:
        return [""] * (n - 1)
    per_row = np.cumsum(np.diff(counts.pairs.indptr))
    rows = np.searchsorted(per_row, per_row[-1] * np.arange(1, n) / n) + 1
    return [str(label) for label in counts.labels[np.minimum(rows, counts.n_labels - 1)]]


def _tile_rows(labels: np.ndarray, cuts: Sequence[str], r: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of sorted ``labels`` in range ``r`` of ``cuts``."""
    bounds = [0, *np.searchsorted(labels, np.asarray(cuts, dtype=object)).tolist(), labels.size]
    return bounds[r], bounds[r + 1]


def _tile(counts: Counts, cuts: Sequence[str], r: int) -> Counts:
    """The rows of ``counts`` in range ``r`` of ``cuts``, over the same vocabulary. Label counts, examples and
    the manifest go with range 0 alone, so that the ranges add up to ``counts``. The pairs are a view: moving
    the tile to another worker moves its rows only."""
    lo, hi = _tile_rows(counts.labels, cuts, r)
    ip = counts.pairs.indptr
    a, b = int(ip[lo]), int(ip[hi])
    indptr = np.empty_like(ip)
    indptr[: lo + 1] = 0
    indptr[lo + 1 : hi + 1] = ip[lo + 1 : hi + 1] - a
    indptr[hi + 1 :] = b - a
    pairs = sp.csr_matrix((counts.pairs.data[a:b], counts.pairs.indices[a:b], indptr), shape=counts.pairs.shape)
    if r == 0:
        return Counts(counts.labels, counts.label_counts, pairs, counts.n_examples, dict(counts.manifest))
    return Counts(counts.labels, np.zeros(counts.n_labels, np.int64), pairs)


def _merge_tile(a: Counts, b: Counts) -> Counts:
    """:func:`_merge_pair`, under its own name: a tile's merges fetch other workers' rows by design, and tests and
    bench/count_tasks.py tell them apart by their task keys."""
    return _merge_pair(a, b)


def _n_pairs(counts: Counts) -> int:
    return counts.n_pairs


class _Tiles:
    """The final sum as row ranges (futures of Counts over one vocabulary, each with only its own rows), put
    together in this process one range at a time into arrays allocated once: the client holds the result and
    one range, not every range and then their concatenation."""

    def __init__(self, tiles: list[Any], cuts: Any):
        self.tiles = tiles
        self.cuts = cuts

    def result(self) -> Counts:
        client = self.cuts.client
        sizes = client.gather([client.submit(_n_pairs, t, pure=False, priority=1) for t in self.tiles])
        cuts = self.cuts.result()
        first = self.tiles[0].result()
        labels, m, n = first.labels, first.n_labels, sum(sizes)
        data, indices = np.empty(n, np.int64), np.empty(n, index_dtype(m, n))
        indptr = np.zeros(m + 1, index_dtype(m, n))
        label_counts, n_examples, manifest = np.zeros(m, np.int64), 0, {}
        at = 0
        for r in range(len(self.tiles)):
            tile = first if r == 0 else self.tiles[r].result()
            first = self.tiles[r] = None  # let the workers drop the range, and this process once it is copied
            if not np.array_equal(tile.labels, labels):
                raise RuntimeError("internal error: the row ranges of the final sum have different vocabularies")
            lo, hi = _tile_rows(labels, cuts, r)
            ip = tile.pairs.indptr
            if ip[lo] != 0 or ip[hi] != tile.n_pairs:
                raise RuntimeError(f"internal error: row range {r} of the final sum has pairs outside its rows")
            data[at : at + tile.n_pairs] = tile.pairs.data
            indices[at : at + tile.n_pairs] = tile.pairs.indices
            indptr[lo + 1 : hi + 1] = ip[lo + 1 : hi + 1].astype(indptr.dtype) + at
            at += tile.n_pairs
            label_counts += tile.label_counts
            n_examples += tile.n_examples
            manifest.update(tile.manifest)
            del tile
        return Counts(labels, label_counts, sp.csr_matrix((data, indices, indptr), shape=(m, m)), n_examples, manifest)


def _wait(total: Any) -> Counts:
    """Counts, from Counts, a future of them or :class:`_Tiles`."""
    return total if isinstance(total, Counts) else total.result()


def _holder(client: Client, future: Any) -> str | None:
    """Address of a worker that holds a finished future's result (None if none does any more)."""
    holders = client.who_has(future).get(future.key) or ()
    return holders[0] if holders else None


def _near(worker: str | None) -> dict[str, Any]:
    """Task placement on ``worker`` while it lives; anywhere once it is gone (its data is then recomputed)."""
    return {"workers": [worker], "allow_other_workers": True} if worker else {}
