"""Example identity across shards: 64-bit fingerprints of example ids, and the store's index of counted ones.

The shard contract says an example's annotations live in one shard. An id that shows up in a second shard is
either a duplicated export or an example split across files; either way counting it again would count its label
pairs twice, so the second shard is rejected. Holding every id string would cost tens of bytes per example, so
each id is reduced to a 64-bit fingerprint (8 bytes per example; for 10^8 random ids the chance of any false
match is about 3e-4, and a reported repeat is confirmed on the actual id strings of the rejected shard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

    def add(self, parts: dict[str, np.ndarray]) -> ExampleIndex:
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


def find_repeats(index: ExampleIndex, new: Sequence[tuple[str, np.ndarray]]) -> list[Repeat]:
    """New shards (in priority order) that share an example id with the index or with an earlier accepted new shard.

    Greedy in the given order: a shard that repeats nothing is accepted, and only accepted shards can make a later
    one a repeat, so a rejected shard never causes another rejection through ids that are not counted.
    """
    if not new:
        return []
    keys = [key for key, _ in new]
    parts = [np.asarray(h, np.uint64) for _, h in new]
    everything = np.sort(np.concatenate([index.hashes, *parts]))  # values only: several times faster than argsort
    repeated = np.unique(everything[1:][everything[1:] == everything[:-1]])
    if repeated.size == 0:
        return []
    # Owners of each repeated fingerprint (fingerprints are distinct within a shard): -1 for the stored index.
    owners = [(-1, index.hashes), *enumerate(parts)]
    members: list[list[int]] = [[] for _ in range(repeated.size)]
    for owner, hashes in owners:
        at = np.searchsorted(hashes, repeated)
        hit = np.flatnonzero(hashes[np.minimum(at, max(hashes.size - 1, 0))] == repeated) if hashes.size else []
        for r in np.asarray(hit).tolist():
            members[r].append(owner)
    # Conflict edges (earlier owner, later owner, fingerprint): every pair of owners of a repeated fingerprint.
    edge_list = [
        (a, b, int(repeated[r])) for r, ms in enumerate(members) for x, a in enumerate(ms) for b in ms[x + 1 :]
    ]
    e = np.array([a for a, _, _ in edge_list], np.int64)
    lt = np.array([b for _, b, _ in edge_list], np.int64)
    f = np.array([h for _, _, h in edge_list], np.uint64)
    repeats: list[Repeat] = []
    accepted: set[int] = set()
    by_later = np.argsort(lt, kind="stable")
    e, lt, f = e[by_later], lt[by_later], f[by_later]
    bounds = np.searchsorted(lt, np.arange(len(new) + 1))
    for shard in range(len(new)):
        lo, hi = bounds[shard], bounds[shard + 1]
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
