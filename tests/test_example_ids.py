"""Example-id fingerprints and the repeat check, against plain-Python references; repeats rejected end to end."""

from __future__ import annotations

import errno
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.embed import EmbedParams, embed
from pmi_pipeline.example_ids import (
    ExampleIndex,
    FingerprintFiles,
    FingerprintWriter,
    find_repeats,
    hash_example_ids,
)
from pmi_pipeline.shards import discover_shards, write_annotation_shard
from pmi_pipeline.store import EmbeddingStore

PARAMS = EmbedParams(dim=8)
MASK = (1 << 64) - 1


def _mix_ref(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def fingerprint_ref(value: int | str) -> int:
    """The fingerprint of one id, one byte at a time, in plain Python."""
    if isinstance(value, int):
        return _mix_ref((value & MASK) ^ 0x243F6A8885A308D3)
    data = value.encode("utf-8")
    h = _mix_ref(len(data) ^ 0x13198A2E03707344)
    for w in range(0, len(data), 8):
        word = int.from_bytes(data[w : w + 8], "little")
        h = _mix_ref(h ^ _mix_ref((word + 0x9E3779B97F4A7C15 * (w // 8 + 1)) & MASK))
    return h


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40).filter(lambda s: "\ud800" not in s), min_size=1, max_size=30))
def test_string_fingerprints_match_the_reference(ids):
    assert hash_example_ids(pa.array(ids, pa.string())).tolist() == [fingerprint_ref(x) for x in ids]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=30))
def test_int_fingerprints_match_the_reference(ids):
    assert hash_example_ids(pa.array(ids, pa.int64())).tolist() == [fingerprint_ref(x) for x in ids]


@pytest.mark.parametrize(
    "a, b",
    [("abcdefgh", "abcdefgi"), ("abcdefgh1", "abcdefgh2"), ("a", "a\x00"), ("", "\x00"), ("x" * 64, "x" * 65)],
)
def test_near_identical_ids_differ(a, b):
    ha, hb = hash_example_ids(pa.array([a, b]))
    assert ha != hb


def test_sliced_chunked_and_large_arrays_agree():
    ids = pa.array([f"img-{i:07d}" for i in range(1000)])
    whole = hash_example_ids(ids)
    np.testing.assert_array_equal(hash_example_ids(ids.slice(100, 50)), whole[100:150])
    np.testing.assert_array_equal(hash_example_ids(pa.chunked_array([ids[:10], ids[10:]])), whole)
    np.testing.assert_array_equal(hash_example_ids(ids.cast(pa.large_string())), whole)
    assert hash_example_ids(pa.array([7]))[0] != hash_example_ids(pa.array(["7"]))[0]


def test_real_ids_do_not_collide(eurlex_dir, bibtex_dir):
    for path in discover_shards([eurlex_dir, bibtex_dir]):
        ids = pq.read_table(path, columns=["example_id"]).column("example_id").unique()
        assert np.unique(hash_example_ids(ids)).size == len(ids)


def repeats_ref(stored: set[int], new: list[tuple[str, set[int]]]) -> list[tuple[str, int]]:
    """Greedy in order, with sets: a shard is rejected if it shares an id with the stored or an accepted one."""
    seen, out = set(stored), []
    for key, ids in new:
        shared = ids & seen
        if shared:
            out.append((key, len(shared)))
        else:
            seen |= ids
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.sets(st.integers(0, 60), max_size=10),
    st.lists(st.sets(st.integers(0, 60), min_size=1, max_size=12), max_size=6),
)
def test_find_repeats_matches_the_reference(stored, shards):
    """In memory or from files, in one fingerprint range or several (values spread over all 64 bits, as
    fingerprints are, so that each range holds some), and with the files added in another order than checked."""
    spread = {i: (i * 0x9E3779B97F4A7C15 ^ i) % 2**64 for i in range(61)}
    stored = {spread[i] for i in stored}
    shards = [{spread[i] for i in ids} for ids in shards]
    index = ExampleIndex.empty().add({"stored": np.array(sorted(stored), np.uint64)}) if stored else None
    new = [(f"s{i}", np.array(sorted(ids), np.uint64)) for i, ids in enumerate(shards)]
    expected = repeats_ref(stored, [(k, set(ids)) for k, ids in zip([k for k, _ in new], shards, strict=True)])
    owner = {"stored": set(stored)} | {k: set(ids) for k, ids in zip([k for k, _ in new], shards, strict=True)}
    files = FingerprintFiles()
    for key, hashes in new[::-1]:
        files.add(key, hashes)
    for found in (
        find_repeats(index or ExampleIndex.empty(), new),
        find_repeats(index or ExampleIndex.empty(), new, n_ranges=8),
        find_repeats(index or ExampleIndex.empty(), files, order=[k for k, _ in new]),
        find_repeats(index or ExampleIndex.empty(), files, order=[k for k, _ in new], n_ranges=4),
    ):
        assert [r.shard for r in found] == [k for k, _ in expected]
        # each reported repeat names a fingerprint the shard really shares with the shard it names
        for r in found:
            assert r.fingerprint in owner[r.shard] and r.fingerprint in owner[r.other]


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("written", [False, True])
def test_fingerprint_files_read_back_whole_and_by_range(written, kernel, monkeypatch):
    """Fingerprints added as arrays, or as a count task wrote them to its file in the files' directory
    (``written``): that file is removed once they are added, and the directory with :meth:`close_directory`.
    Without the kernel's help (``kernel``: no ``preadv``, and a ``copy_file_range`` that fails, as on a file
    system that cannot), through this process instead."""
    if not kernel:

        def cannot(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.delattr(os, "preadv", raising=False)
        monkeypatch.setattr(os, "copy_file_range", cannot, raising=False)
    rng = np.random.default_rng(0)
    hashes = np.unique(rng.integers(0, 2**64 - 1, 10_000, dtype=np.uint64, endpoint=True))
    hashes[-1] = np.uint64(2**64 - 1)  # the largest fingerprint falls in the last range
    files = FingerprintFiles()
    files.add("before", hashes[:3])  # the files' own bytes come first: what is copied in goes after them
    parts = [hashes, np.empty(0, np.uint64)]
    if written:
        writer = FingerprintWriter(files.directory)
        parts = [writer.write(part) for part in parts]
        writer.close()
        assert [p.offset for p in parts] == [0, hashes.nbytes] and os.listdir(files.directory) == [
            os.path.basename(writer.path)
        ]
    files.add("a", parts[0])
    files.add("empty", parts[1])
    files.release(parts)
    assert os.listdir(files.directory) == []
    files.discard("before")
    np.testing.assert_array_equal(files["a"], hashes)
    for n in (1, 16, 256):
        parts = [files.range("a", r, n) for r in range(n)]
        np.testing.assert_array_equal(np.concatenate(parts), hashes)
        into = np.zeros(hashes.size + 2, np.uint64)  # read into a slice of a larger array, as find_repeats does
        at = np.cumsum([1] + [files.range_size("a", r, n) for r in range(n)])
        for r in range(n):
            files.range("a", r, n, into[at[r] : at[r + 1]])
        np.testing.assert_array_equal(into[1:-1], hashes)
        assert into[0] == 0 and into[-1] == 0
        assert all(p.size == 0 or p[0] >> np.uint64(64 - n.bit_length() + 1) == r for r, p in enumerate(parts[1:], 1))
        assert all(files.range("empty", r, n).size == 0 for r in range(n))
    assert sorted(files) == ["a", "empty"] and len(files) == 2 and files.n_fingerprints == hashes.size
    with pytest.raises(ValueError, match="counted twice"):
        files.add("a", hashes)
    files.discard("a")
    assert "a" not in files and len(files) == 1
    files.close_directory()
    assert not os.path.exists(files.directory)


def test_a_run_removes_the_fingerprint_directories_of_killed_runs(tmp_path, monkeypatch):
    """A run killed mid-count (SIGKILL) leaves its count tasks' fingerprint directory behind; the next run on the
    same machine removes it, but not those of live processes, of other hosts, or of other programs."""
    import subprocess
    import sys

    from pmi_pipeline import example_ids

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    names = {
        "killed": f"pmi-pipeline-ids-{gone.pid}@{example_ids._HOST}-abc123",
        "live": f"pmi-pipeline-ids-{os.getpid()}@{example_ids._HOST}-def456",
        "other host": f"pmi-pipeline-ids-{gone.pid}@elsewhere.example-ghi789",
        "other program": "pmi-pipeline-ids-unrelated",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "task-1.u64").write_bytes(b"\0" * 8)
    files = FingerprintFiles()
    assert os.path.dirname(files.directory) == str(tmp_path)
    left = set(os.listdir(tmp_path)) - {os.path.basename(files.directory)}
    assert left == {names["live"], names["other host"], names["other program"]}


def _shard(path, ids, labels):
    return write_annotation_shard(path, ids, labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_id_repeated_across_shards_in_one_run_rejects_the_later_shard(tmp_path, workers, dask_clients):
    a = _shard(tmp_path / "in" / "a.parquet", ["x1", "x2", "x3"], [["p", "q"], ["q", "r"], ["p", "r"]])
    b = _shard(tmp_path / "in" / "b.parquet", ["y1", "x2", "y3"], [["p"], ["q", "s"], ["r", "s"]])
    c = _shard(tmp_path / "in" / "c.parquet", ["z1", "z2"], [["p", "s"], ["q", "s"]])
    result = embed([tmp_path / "in"], tmp_path / "s", PARAMS, dask_clients[workers] if workers else None)
    assert len(result.rejected) == 1
    message = result.rejected[0]
    assert str(b) in message and "row 1" in message and "example_id" in message and "'x2'" in message
    assert str(a) in message
    counts = EmbeddingStore(tmp_path / "s").read_counts()
    assert counts.equals(count_shards([a, c]).counts)  # nothing of b
    assert len(EmbeddingStore(tmp_path / "s").read_example_index()) == 5


def test_an_id_repeated_from_an_earlier_version_is_rejected_and_nothing_is_published(tmp_path):
    a = _shard(tmp_path / "a.parquet", [1, 2, 3], [["p", "q"], ["q"], ["p", "r"]])
    embed([a], tmp_path / "s", PARAMS)
    b = _shard(tmp_path / "b.parquet", [4, 5, 3], [["p"], ["q", "s"], ["r", "s"]])
    result = embed([a, b], tmp_path / "s", PARAMS)
    assert result.version is None and len(result.rejected) == 1
    assert str(b) in result.rejected[0] and "row 2" in result.rejected[0] and str(a) in result.rejected[0]
    store = EmbeddingStore(tmp_path / "s")
    assert store.versions() == ["v0001"] and store.read_counts().equals(count_shards([a]).counts)
    # the same ids under another type are other ids: "3" is not 3
    c = _shard(tmp_path / "c.parquet", ["3"], [["p", "s"]])
    assert embed([c], tmp_path / "s", PARAMS).version == "v0002"
