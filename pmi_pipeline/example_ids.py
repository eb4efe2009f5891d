"""Example identity across shards: 64-bit fingerprints of example ids, and the store's index of counted ones.

The shard contract says an example's annotations live in one shard. An id that shows up in a second shard is
either a duplicated export or an example split across files; either way counting it again would count its label
pairs twice, so the second shard is rejected. Holding every id string would cost tens of bytes per example, so
each id is reduced to a 64-bit fingerprint (8 bytes per example; for 10^8 random ids the chance of any false
match is about 3e-4, and a reported repeat is confirmed on the actual id strings of the rejected shard).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INT_SEED = np.uint64(0x243F6A8885A308D3)  # ints and strings hash apart: id 7 and id "7" are different ids
_STR_SEED = np.uint64(0x13198A2E03707344)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that spreads every input bit over the output."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_example_ids(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit fingerprints of example ids (int or string column), vectorized: no Python loop over ids."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    with np.errstate(over="ignore"):
        if pa.types.is_integer(ids.type):
            return _mix(ids.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64) ^ _INT_SEED)
        binary = ids.cast(pa.large_binary())
        n = len(binary)
        offsets = np.frombuffer(binary.buffers()[1], np.int64)[binary.offset : binary.offset + n + 1]
        data = np.frombuffer(binary.buffers()[2], np.uint8) if n else np.empty(0, np.uint8)
        data = np.concatenate([data, np.zeros(8, np.uint8)])  # reads past the last id stay in bounds
        lengths = np.diff(offsets)
        # Longest ids first, so the ids that still have an 8-byte word left are always a prefix.
        order = np.argsort(-lengths, kind="stable")
        starts, lens = offsets[:-1][order], lengths[order]
        h = _mix(lens.astype(np.uint64) ^ _STR_SEED)
        words = (lens + 7) // 8
        for w in range(int(words[0]) if n else 0):
            k = int(np.count_nonzero(words > w))
            pos = starts[:k] + 8 * w
            valid = np.minimum(lens[:k] - 8 * w, 8)  # bytes of this word inside the id
            word = np.zeros(k, np.uint64)
            for b in range(8):
                byte = data[pos + b].astype(np.uint64)
                word |= np.where(b < valid, byte, np.uint64(0)) << np.uint64(8 * b)
            h[:k] = _mix(h[:k] ^ _mix(word + _GOLDEN * np.uint64(w + 1)))
        out = np.empty(n, np.uint64)
        out[order] = h
        return out


@dataclass
class ExampleIndex:
    """Fingerprints of every counted example, sorted, each with the index of its shard in ``shards``."""

    hashes: np.ndarray  # (n,) uint64, strictly increasing
    shard: np.ndarray  # (n,) int32, index into ``shards``
    shards: list[str]  # content hashes of the shards, as in the counts' manifest

    @classmethod
    def empty(cls) -> ExampleIndex:
        return cls(np.empty(0, np.uint64), np.empty(0, np.int32), [])

    def __len__(self) -> int:
        return int(self.hashes.size)

    def add(self, parts: Mapping[str, np.ndarray]) -> ExampleIndex:
        """This index plus new shards' fingerprints (which must not repeat any: see :func:`find_repeats`)."""
        shards = self.shards + sorted(parts)
        hashes = [self.hashes] + [np.asarray(parts[s], np.uint64) for s in sorted(parts)]
        owner = [self.shard] + [
            np.full(np.asarray(parts[s]).size, len(self.shards) + i, np.int32) for i, s in enumerate(sorted(parts))
        ]
        all_hashes, all_owner = np.concatenate(hashes), np.concatenate(owner)
        order = np.argsort(all_hashes, kind="stable")
        return ExampleIndex(all_hashes[order], all_owner[order], shards)


@dataclass(frozen=True)
class Repeat:
    """A new shard that repeats an example of an earlier shard: ``fingerprint`` is one of the repeated ids."""

    shard: str  # the repeating shard's key (as given to find_repeats)
    other: str  # the earlier shard's key: a stored shard's content hash or an earlier new shard's key
    fingerprint: int
    n_repeated: int


#: About how many fingerprints the repeat check holds at once (8 bytes each, plus a sorted copy): it goes through
#: the fingerprint space in as many equal ranges as that takes, instead of sorting all of them together.
RANGE_FINGERPRINTS = 1 << 20
#: The finest split of the fingerprint space that :class:`FingerprintFiles` can read by (a power of 2).
MAX_RANGES = 256


@dataclass(frozen=True, eq=False)
class StoredFingerprints:
    """A shard's sorted fingerprints as a count task wrote them (:class:`FingerprintWriter`): where they are, and
    their range bounds (``_range_bounds`` with :data:`MAX_RANGES`; the last is how many there are)."""

    path: str
    offset: int  # bytes
    bounds: np.ndarray


class FingerprintWriter:
    """Writes the fingerprints of a count task's shards, each as soon as its shard is read, to a new file in a
    directory of :class:`FingerprintFiles` (``FingerprintFiles.directory``) that the task's process can reach.

    Returned with the task's outcomes instead, a batch's fingerprints (8 bytes per example: 7 MiB for a batch of
    8 MiB of Parquet) were held by the worker until the batch ended and the client fetched them, a second batch's
    often with them: 13 MiB of a worker's peak at 10^8 annotations (docs/performance.md, eleventh pass)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, f"task-{uuid.uuid4().hex}.u64")
        self._file: Any = None
        self._end = 0

    def write(self, hashes: np.ndarray) -> StoredFingerprints:
        hashes = np.ascontiguousarray(hashes, np.uint64)
        if self._file is None:
            self._file = open(self.path, "xb")  # closed by close(), once the task's shards are done
        self._file.write(hashes.data)
        stored = StoredFingerprints(self.path, self._end, _range_bounds(hashes, MAX_RANGES))
        self._end += hashes.nbytes
        return stored

    def close(self) -> None:
        """Flush and close (before the task returns: the client reads the file once it has the outcomes)."""
        if self._file is not None:
            self._file, file = None, self._file
            file.close()


class FingerprintFiles(Mapping[str, np.ndarray]):
    """Shards' sorted fingerprints, appended to one temporary file, readable one fingerprint range at a time.

    Counting 10^8 annotations gathers fingerprints of 2 x 10^7 examples (160 MB); kept here, what the counting
    process holds stays flat however many examples there are, and :func:`find_repeats` reads one range of every
    shard at a time (one ``pread`` each on the open file: opening a file per read cost as much as the check's
    sorting). The file (in ``TMPDIR``: 8 bytes per example) goes with the object. Count tasks that can reach
    :attr:`directory` (a LocalCluster's workers: the same machine) write their shards' fingerprints there
    (:class:`FingerprintWriter`), and :meth:`add` copies them into the file in the kernel and removes the task's
    file: they never pass through the worker's results nor this process's memory.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="pmi-pipeline-ids-")
        self._end = 0
        self._shards: dict[str, tuple[int, np.ndarray]] = {}  # key -> where its fingerprints start, range bounds
        # named for this process, so that a later run can tell that its owner is gone (_sweep_abandoned)
        self.directory = tempfile.mkdtemp(prefix=f"{_DIRECTORY_PREFIX}{os.getpid()}@{_HOST}-")
        # the count tasks' files that are left (a task that failed, or was run twice): removed with the object
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        _sweep_abandoned(os.path.dirname(self.directory))

    def add(self, key: str, hashes: np.ndarray | StoredFingerprints) -> None:
        """Keep a shard's fingerprints (sorted, distinct) under ``key``: an array, or where a count task wrote
        them (that task's file is removed by :meth:`release`)."""
        if key in self._shards:
            raise ValueError(f"shard counted twice: {key}")
        if isinstance(hashes, StoredFingerprints):
            bounds, nbytes = hashes.bounds, 8 * int(hashes.bounds[-1])
            with open(hashes.path, "rb") as source:
                _copy_bytes(source.fileno(), hashes.offset, self._file.fileno(), self._end, nbytes)
        else:
            hashes = np.ascontiguousarray(hashes, np.uint64)
            os.pwrite(self._file.fileno(), hashes.data, self._end)
            bounds, nbytes = _range_bounds(hashes, MAX_RANGES), hashes.nbytes
        self._shards[key] = (self._end, bounds)
        self._end += nbytes

    def close_directory(self) -> None:
        """Remove :attr:`directory` and whatever count tasks left in it: once no task of the count can write."""
        self._cleanup()

    def release(self, stored: Iterable[np.ndarray | StoredFingerprints]) -> None:
        """Remove the files of count tasks whose fingerprints were added (a no-op for arrays)."""
        for path in {s.path for s in stored if isinstance(s, StoredFingerprints)}:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def range(self, key: str, r: int, n_ranges: int, out: np.ndarray | None = None) -> np.ndarray:
        """The fingerprints of ``key`` in range ``r`` of ``n_ranges`` equal ones (a power of 2), read into ``out``
        if given (of :meth:`range_size`)."""
        start, bounds = self._shards[key]
        step = MAX_RANGES // n_ranges
        return self._read(start, int(bounds[r * step]), int(bounds[(r + 1) * step]), out)

    def range_size(self, key: str, r: int, n_ranges: int) -> int:
        """How many fingerprints of ``key`` are in range ``r`` of ``n_ranges``."""
        bounds = self._shards[key][1]
        step = MAX_RANGES // n_ranges
        return int(bounds[(r + 1) * step] - bounds[r * step])

    def _read(self, start: int, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(hi - lo, np.uint64) if out is None else out
        if out.size != hi - lo:
            raise ValueError(f"{out.size} places to read {hi - lo} fingerprints into")
        view, at = memoryview(out).cast("B"), start + 8 * lo
        while view.nbytes:  # straight into the array: no bytes object, no copy
            n = _read_into(self._file.fileno(), view, at)
            if n <= 0:
                raise OSError(f"fingerprint file ended early: {view.nbytes} bytes short")
            view, at = view[n:], at + n
        return out

    @property
    def n_fingerprints(self) -> int:
        return sum(int(bounds[-1]) for _, bounds in self._shards.values())

    def discard(self, key: str) -> None:
        del self._shards[key]  # its bytes stay in the file until it goes

    def __getitem__(self, key: str) -> np.ndarray:
        start, bounds = self._shards[key]
        return self._read(start, 0, int(bounds[-1]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._shards)

    def __len__(self) -> int:
        return len(self._shards)


_DIRECTORY_PREFIX = "pmi-pipeline-ids-"
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _sweep_abandoned(parent: str) -> None:
    """Remove the count tasks' fingerprint directories that runs on this machine left when they were killed (a
    finished or failed run removes its own): those named for a process of this host that no longer exists. A
    directory of another host (a ``TMPDIR`` several machines share) or of a live process is left alone."""
    pattern = re.compile(re.escape(_DIRECTORY_PREFIX) + r"(\d+)@(.+)-[a-z0-9_]+")
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if not match or match.group(2) != _HOST or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:  # gone: its directory is abandoned
                shutil.rmtree(entry.path, ignore_errors=True)
            except (PermissionError, OverflowError):  # another user's live process, or not a pid
                continue


def _read_into(fd: int, view: memoryview, at: int) -> int:
    """``os.preadv`` into ``view`` (bytes read), or ``os.pread`` and a copy where there is no ``preadv``."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], at)
    data = os.pread(fd, view.nbytes, at)
    view[: len(data)] = data
    return len(data)


def _copy_bytes(source: int, at: int, target: int, to: int, n: int) -> None:
    """Copy ``n`` bytes between open files, in the kernel where it can (``copy_file_range``)."""
    while n > 0:
        try:
            copied = os.copy_file_range(source, target, n, at, to)
        except (AttributeError, OSError):  # not Linux, or a file system that cannot: through this process
            copied = os.pwrite(target, os.pread(source, min(n, 1 << 20), at), to)
        if copied <= 0:
            raise OSError(f"fingerprint file ended early: {n} bytes short")
        at, to, n = at + copied, to + copied, n - copied


def _range_bounds(hashes: np.ndarray, n_ranges: int) -> np.ndarray:
    """Where each of ``n_ranges`` equal fingerprint ranges (a power of 2) starts in sorted ``hashes``, and their
    end."""
    shift = 64 - (n_ranges.bit_length() - 1)
    edges = np.array([r << shift if shift < 64 else 0 for r in range(n_ranges)], np.uint64)
    return np.append(np.searchsorted(hashes, edges), hashes.size)


def _n_ranges(n_fingerprints: int) -> int:
    """Ranges enough for about :data:`RANGE_FINGERPRINTS` per range: a power of 2, at most :data:`MAX_RANGES`."""
    needed = -(-n_fingerprints // RANGE_FINGERPRINTS)
    return min(MAX_RANGES, 1 << max(0, needed - 1).bit_length())


def find_repeats(
    index: ExampleIndex,
    new: Sequence[tuple[str, np.ndarray]] | FingerprintFiles,
    *,
    order: Sequence[str] | None = None,
    n_ranges: int | None = None,
) -> list[Repeat]:
    """New shards (in priority order) that share an example id with the index or with an earlier accepted new shard.

    ``new`` is (key, sorted fingerprints) pairs, or :class:`FingerprintFiles` taken in ``order`` (default: the
    order they were added). Greedy in the given order: a shard that repeats nothing is accepted, and only
    accepted shards can make a later one a repeat, so a rejected shard never causes another rejection through ids
    that are not counted. Conflicts are found one fingerprint range at a time (``n_ranges``, a power of 2 up to
    :data:`MAX_RANGES`; by default enough for about :data:`RANGE_FINGERPRINTS` each), so the working memory is
    bounded, not all fingerprints and their sorted copies.
    """
    if isinstance(new, FingerprintFiles):
        files = new
        keys = list(order if order is not None else files)
        n_ranges = n_ranges or _n_ranges(len(index) + files.n_fingerprints)

        def size(key: str, r: int) -> int:
            return files.range_size(key, r, n_ranges)

        def read(key: str, r: int, out: np.ndarray | None = None) -> np.ndarray:
            return files.range(key, r, n_ranges, out)

    else:
        keys = [key for key, _ in new]
        arrays = {key: np.asarray(h, np.uint64) for key, h in new}
        n_ranges = n_ranges or _n_ranges(len(index) + sum(a.size for a in arrays.values()))
        bounds = {key: _range_bounds(h, n_ranges) for key, h in arrays.items()}

        def size(key: str, r: int) -> int:
            return int(bounds[key][r + 1] - bounds[key][r])

        def read(key: str, r: int, out: np.ndarray | None = None) -> np.ndarray:
            part = arrays[key][bounds[key][r] : bounds[key][r + 1]]
            if out is None:
                return part
            out[...] = part
            return out

    if not keys:
        return []
    stored = _range_bounds(index.hashes, n_ranges)

    def conflicts(r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Every shard's part of the range read into one array, sorted in place: the range is held once. Which
        # shards hold a repeated fingerprint is found by reading their parts again, only where there is one.
        known = index.hashes[stored[r] : stored[r + 1]]
        ends = np.cumsum([known.size, *(size(key, r) for key in keys)])
        everything = np.empty(int(ends[-1]), np.uint64)
        everything[: known.size] = known
        for key, lo, hi in zip(keys, ends[:-1].tolist(), ends[1:].tolist(), strict=True):
            read(key, r, everything[lo:hi])
        return _conflicts(everything, lambda: [known, *(read(key, r) for key in keys)])

    # Ranges on threads (reads and sorts release the GIL): the check runs once the count tasks are done, when the
    # workers have only the last merges left.
    with ThreadPoolExecutor(max_workers=min(n_ranges, os.cpu_count() or 1)) as pool:
        edges_found = list(pool.map(conflicts, range(n_ranges)))
    e = np.concatenate([x[0] for x in edges_found])
    lt = np.concatenate([x[1] for x in edges_found])
    f = np.concatenate([x[2] for x in edges_found])
    if not e.size:
        return []
    repeats: list[Repeat] = []
    accepted: set[int] = set()
    by_later = np.argsort(lt, kind="stable")
    e, lt, f = e[by_later], lt[by_later], f[by_later]
    bounds_of = np.searchsorted(lt, np.arange(len(keys) + 1))
    for shard in range(len(keys)):
        lo, hi = bounds_of[shard], bounds_of[shard + 1]
        live = [k for k in range(lo, hi) if e[k] == -1 or int(e[k]) in accepted]
        if not live:
            accepted.add(shard)
            continue
        k = live[0]
        if e[k] == -1:
            other = index.shards[int(index.shard[np.searchsorted(index.hashes, f[k])])]
        else:
            other = keys[int(e[k])]
        repeats.append(Repeat(keys[shard], other, int(f[k]), len({int(f[j]) for j in live})))
    return repeats


def _conflicts(
    everything: np.ndarray, owners: Callable[[], Sequence[np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (earlier owner, later owner, fingerprint) for fingerprints in more than one of the sorted arrays
    (distinct within each) that ``owners()`` returns, ``everything`` being their concatenation (sorted here, in
    place); owners are numbered from -1 (the first array: the stored index)."""
    everything.sort()  # values only, in place: several times faster than argsort, no second copy
    repeated = np.unique(everything[1:][everything[1:] == everything[:-1]])
    none = np.empty(0, np.int64)
    if repeated.size == 0:
        return none, none, np.empty(0, np.uint64)
    members: list[list[int]] = [[] for _ in range(repeated.size)]
    for owner, hashes in enumerate(owners(), start=-1):
        if not hashes.size:
            continue
        at = np.minimum(np.searchsorted(hashes, repeated), hashes.size - 1)
        for r in np.flatnonzero(hashes[at] == repeated).tolist():
            members[r].append(owner)
    edge_list = [
        (a, b, int(repeated[r])) for r, ms in enumerate(members) for x, a in enumerate(ms) for b in ms[x + 1 :]
    ]
    return (
        np.array([a for a, _, _ in edge_list], np.int64),
        np.array([b for _, b, _ in edge_list], np.int64),
        np.array([h for _, _, h in edge_list], np.uint64),
    )
