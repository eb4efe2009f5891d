"""Label and label-pair co-occurrence counts, computed shard by shard and summed.

Counts form a commutative monoid: :meth:`Counts.merge` adds two of them over the union of their vocabularies, so
the total over a corpus is a tree-sum of per-shard counts (on Dask workers), and new shards add to what a store
already holds without recounting. Memory is bounded by one shard plus the distinct pairs, never by the corpus.

Per shard: the binary example x label matrix ``Y`` (CSR), ``Y.T @ Y`` gives pair counts off the diagonal and label
counts on it. Pairs are kept once, in the strict upper triangle of the vocabulary order.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from pmi_pipeline.errors import ShardError
from pmi_pipeline.example_ids import ExampleIndex, Repeat, find_repeats, hash_example_ids
from pmi_pipeline.faults import fault_point
from pmi_pipeline.shards import ID_COLUMN, Annotations, read_annotations

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
    pairs: sp.csr_matrix  # (m, m) int64, strictly upper triangular
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
        return Counts(
            labels,
            a.label_counts + b.label_counts,
            (a.pairs + b.pairs).tocsr(),
            self.n_examples + other.n_examples,
            {**self.manifest, **other.manifest},
        )

    @staticmethod
    def sum(counts: Iterable[Counts]) -> Counts:
        """Sum over the sorted union of the vocabularies, merged pairwise as they come (``_RunningSum``, the same
        summation as :func:`count_shards`); the result is in sorted order."""
        running = _RunningSum(None)
        for c in counts:
            running.add(c)
        return running.result()

    def sorted(self) -> Counts:
        """The same counts with the vocabulary in sorted order: a canonical form, whatever the merge order."""
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


def _sorted_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted union of two vocabularies and where each one's labels land in it, in one hash pass and one sort
    in Arrow (Python sets and ``sorted`` took seconds per merge at 10^6 labels)."""
    both = pc.dictionary_encode(pa.array(np.concatenate([a, b]), pa.string()))
    distinct = both.dictionary
    order = pc.sort_indices(distinct).to_numpy(zero_copy_only=False)
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    position = rank[both.indices.to_numpy(zero_copy_only=False)]
    labels = distinct.take(pa.array(order)).to_numpy(zero_copy_only=False).astype(object)
    return labels, position[: a.size], position[a.size :]


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
    dtype = _index_dtype(m, pairs.nnz)
    indptr = np.zeros(m + 1, dtype=dtype)
    indptr[position + 1] = np.diff(pairs.indptr)
    np.cumsum(indptr, out=indptr)
    return sp.csr_matrix((pairs.data, position.astype(dtype)[pairs.indices], indptr), shape=(m, m))


def _index_dtype(m: int, nnz: int) -> type:
    """int32 CSR indices while they fit: 12 bytes per stored pair instead of 16, in every merge."""
    return np.int32 if max(m, nnz) < 2**31 - 1 else np.int64


def _upper_csr(rows: np.ndarray, cols: np.ndarray, data: np.ndarray, m: int) -> sp.csr_matrix:
    """Symmetric pair entries folded into the strict upper triangle, duplicates summed."""
    lo, hi = np.minimum(rows, cols), np.maximum(rows, cols)
    mat = sp.csr_matrix((np.asarray(data, np.int64), (lo, hi)), shape=(m, m), dtype=np.int64)
    mat.sum_duplicates()
    return mat


#: Label pairs enumerated at once when counting a shard (about 32 bytes each): bounds a shard's working memory
#: however many labels its examples have.
PAIR_BLOCK = 1 << 22


def upper_pair_counts(
    example_codes: np.ndarray, label_codes: np.ndarray, m: int, *, block: int = PAIR_BLOCK
) -> sp.csr_matrix:
    """Strict upper triangle of ``Y.T @ Y`` for a binary ``Y`` given as distinct (example, label) codes sorted by
    example, then label.

    Each example's label pairs (a < b) are enumerated directly and counted by sorting their keys ``a * m + b``:
    half the work of the symmetric sparse product, with no diagonal to drop and no second pass to size the
    output, which makes it about twice as fast as scipy's ``Y.T @ Y`` + ``triu`` (docs/performance.md). The
    sorted keys are the CSR structure itself.
    """
    nnz = example_codes.size
    per_example = np.bincount(example_codes) if nnz else np.empty(0, np.int64)
    ends = np.cumsum(per_example)
    after = ends[example_codes] - np.arange(nnz) - 1  # labels after this one in its example
    starts = ends - per_example
    pairs_of_example = per_example * (per_example - 1) // 2
    cumulative = np.cumsum(pairs_of_example)
    total = int(cumulative[-1]) if cumulative.size else 0
    bounds = np.searchsorted(cumulative, np.arange(block, total, block))  # examples per block of ~block pairs
    keys, counts = [], []
    lo = 0
    for example_hi in [*bounds.tolist(), per_example.size]:
        a_lo, a_hi = (int(starts[lo]), int(ends[example_hi - 1])) if example_hi > lo else (0, 0)
        lo = example_hi
        if a_hi <= a_lo:
            continue
        k, c = _count_keys(label_codes[a_lo:a_hi], after[a_lo:a_hi], m)
        keys.append(k)
        counts.append(c)
    if len(keys) > 1:  # examples with very many labels: several blocks, summed
        all_keys, all_counts = np.concatenate(keys), np.concatenate(counts)
        order = np.argsort(all_keys, kind="stable")
        all_keys, all_counts = all_keys[order], all_counts[order]
        first = np.flatnonzero(np.concatenate(([True], all_keys[1:] != all_keys[:-1])))
        keys, counts = [all_keys[first]], [np.add.reduceat(all_counts, first)]
    uniq = keys[0] if keys else np.empty(0, np.int64)
    data = counts[0] if counts else np.empty(0, np.int64)
    dtype = _index_dtype(m, uniq.size)
    indptr = np.zeros(m + 1, dtype)
    np.cumsum(np.bincount(uniq // max(m, 1), minlength=m), out=indptr[1:])
    return sp.csr_matrix((data, (uniq % max(m, 1)).astype(dtype), indptr), shape=(m, m))


def _count_keys(labels: np.ndarray, after: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pair keys ``a * m + b`` (sorted) and their counts, for annotations each paired with the ``after``
    annotations that follow it in its example."""
    n_pairs = int(after.sum())
    first = np.repeat(np.arange(labels.size), after)
    offset = np.repeat(np.cumsum(after) - after, after)
    second = first + 1 + (np.arange(n_pairs) - offset)
    del offset
    keys = labels[first] * m + labels[second]
    del first, second
    keys.sort()
    if not keys.size:
        return keys, np.empty(0, np.int64)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], np.diff(np.append(starts, keys.size)).astype(np.int64)


def counts_from_annotations(ann: Annotations) -> Counts:
    """Counts of one validated shard: label counts, and pair counts (the strict upper triangle of ``Y.T @ Y``)."""
    m = ann.labels.size
    label_counts = np.bincount(ann.label_codes, minlength=m).astype(np.int64)
    pairs = upper_pair_counts(ann.example_codes, ann.label_codes, m)
    manifest = {
        ann.sha256: {
            "path": str(ann.path),
            "n_examples": ann.n_examples,
            "n_annotations": ann.n_annotations,
            "n_rows": ann.n_rows,
        }
    }
    return Counts(ann.labels, label_counts, pairs, ann.n_examples, manifest)


def count_shard(path: str | Path, expected_sha256: str | None = None) -> Counts:
    """Validate and count one shard, in its own sorted vocabulary (so the result is cacheable by content hash)."""
    return counts_from_annotations(read_annotations(path, expected_sha256=expected_sha256))


def count_shard_with_ids(path: str | Path, expected_sha256: str | None = None) -> tuple[Counts, np.ndarray]:
    """:func:`count_shard` and the shard's example-id fingerprints (sorted uint64), for the repeat check."""
    ann = read_annotations(path, expected_sha256=expected_sha256)
    return counts_from_annotations(ann), ann.example_ids


def _count_or_error(path: str, expected_sha256: str | None) -> tuple[Counts, np.ndarray] | ShardError:
    # Returned, not raised, so that one bad shard does not cancel the other tasks.
    try:
        return count_shard_with_ids(path, expected_sha256)
    except ShardError as exc:
        return exc


def _merge_pair(a: Counts, b: Counts) -> Counts:
    return a.merge(b, sorted_union=True)


def _first(pair: tuple[Counts, np.ndarray]) -> Counts:
    return pair[0]


@dataclass
class CountResult:
    counts: Counts  # in sorted vocabulary order
    rejected: list[ShardError]
    seconds: float
    example_ids: dict[str, np.ndarray] = field(default_factory=dict)  # content hash -> fingerprints, counted shards


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
) -> CountResult:
    """Count shards and sum them. Bad shards are collected in ``rejected`` and contribute nothing.

    With a Dask ``client`` each shard is a task, and shards are summed as they finish by merge tasks on the
    workers (a binary counter: at most one partial sum per size class waits), so worker memory holds a few partial
    sums and never every shard's counts; only the final counts and the example-id fingerprints (8 bytes per
    example) travel back. Without one, shards are counted and summed one after another in this process.
    ``progress(done, total)`` is called as shards finish.

    ``expected_hashes`` (one per path: the hash it was listed with) rejects a shard that changed since. A shard
    that repeats an example id of ``index`` (the store's counted examples) or of an earlier path is rejected too;
    ``names`` maps the index's shard hashes to paths for that message. Repeats are found once every shard is
    counted; in that (exceptional) case the shards that remain are summed again without the rejected ones.
    """
    start = time.perf_counter()
    paths = [str(p) for p in paths]
    expected = list(expected_hashes) if expected_hashes is not None else [None] * len(paths)
    total = len(paths)
    rejected: list[ShardError] = []
    fingerprints: dict[int, np.ndarray] = {}
    digests: dict[int, str] = {}
    sums = _RunningSum(client)
    done = 0
    if client is None:
        for i, path in enumerate(paths):
            result = _count_or_error(path, expected[i])
            if isinstance(result, ShardError):
                rejected.append(result)
            else:
                counts, fingerprints[i] = result
                digests[i] = next(iter(counts.manifest))
                sums.add(counts)
            done += 1
            fault_point("count:shard-done")
            if progress:
                progress(done, total)
    else:
        from distributed import as_completed

        # Keys unique to this run: two runs sharing a scheduler must never receive each other's results.
        futures = client.map(
            _count_or_error,
            paths,
            expected,
            pure=False,
            key=[f"count-shard-{uuid.uuid4().hex[:12]}-{i}" for i in range(total)],
        )
        position = {f.key: i for i, f in enumerate(futures)}
        identity: dict[int, Any] = {}  # futures of (content hash, fingerprints): all fetched at once below
        for future in as_completed(futures):
            error = future.exception()
            if error is not None:
                raise error
            # future.type is known to the scheduler: only a (small) error travels here, counts stay on workers
            if isinstance(future.type, type) and issubclass(future.type, ShardError):
                rejected.append(future.result())
            else:
                i = position[future.key]
                identity[i] = client.submit(_identity, future, pure=False)
                sums.add(client.submit(_first, future, pure=False))
            future.release()  # the shard's counts live on in the merge tasks that use them, then go
            done += 1
            fault_point("count:shard-done")
            if progress:
                progress(done, total)
        del futures
        for i, (digest, ids) in zip(identity, client.gather(list(identity.values())), strict=True):
            digests[i], fingerprints[i] = digest, ids
    counts = sums.result()

    if check_repeats:
        # Example ids repeated across shards: decided in the paths' order, so the outcome never depends on timing.
        order = sorted(fingerprints)
        repeats = find_repeats(index or ExampleIndex.empty(), [(str(i), fingerprints[i]) for i in order])
        if repeats:
            names = names or {}
            for repeat in repeats:
                i = int(repeat.shard)
                other = paths[int(repeat.other)] if repeat.other.isdigit() else names.get(repeat.other, repeat.other)
                rejected.append(repeat_error(paths[i], repeat, f"shard {other}"))
            dropped = {int(r.shard) for r in repeats}
            kept = [i for i in order if i not in dropped]
            log.warning("%d shard(s) repeat example ids: summing the other %d again", len(dropped), len(kept))
            again = count_shards(
                [paths[i] for i in kept], client, expected_hashes=[expected[i] for i in kept], check_repeats=False
            )
            rejected.extend(again.rejected)
            counts = again.counts
            # only what was counted again (a shard may have changed since) goes into the example-id index
            fingerprints = {i: fingerprints[i] for i in kept if digests[i] in counts.manifest}
    rejected.sort(key=lambda e: str(e.path))
    fault_point("count:merged")
    return CountResult(
        counts.sorted(), rejected, time.perf_counter() - start, {digests[i]: fingerprints[i] for i in fingerprints}
    )


class _RunningSum:
    """Sum counts as they arrive, as a binary counter: a partial sum of 2^k shards waits only for another of the
    same size, so at most one per size class is held (log2 of the shard count), and merges stay balanced."""

    def __init__(self, client: Client | None):
        self.client = client
        self.stack: list[tuple[int, Any]] = []  # (size class, Counts or a future of Counts)

    def _merge(self, a: Any, b: Any) -> Any:
        return self.client.submit(_merge_pair, a, b, pure=False) if self.client else _merge_pair(a, b)

    def add(self, counts: Any) -> None:
        level = 0
        if self.client is None:
            counts = counts.sorted()
        while self.stack and self.stack[-1][0] == level:
            _, previous = self.stack.pop()
            counts = self._merge(previous, counts)
            level += 1
        self.stack.append((level, counts))

    def result(self) -> Counts:
        if not self.stack:
            return Counts.empty()
        total = self.stack.pop()[1]
        while self.stack:
            total = self._merge(self.stack.pop()[1], total)
        self.stack = []
        return total.result() if self.client else total


def _identity(pair: tuple[Counts, np.ndarray]) -> tuple[str, np.ndarray]:
    return next(iter(pair[0].manifest)), pair[1]
