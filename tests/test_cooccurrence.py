"""Counting against an in-memory scipy reference on real data; additivity; split and worker invariance."""

from __future__ import annotations

import gc
import itertools
import os
import weakref

import dask.utils
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import reference_counts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmi_pipeline import cooccurrence
from pmi_pipeline.cooccurrence import (
    BATCHES_PER_SLOT,
    Counts,
    count_batch,
    count_shard,
    count_shards,
    plan_batches,
    upper_pair_counts,
)
from pmi_pipeline.errors import ShardError
from pmi_pipeline.example_ids import FingerprintFiles, StoredFingerprints
from pmi_pipeline.shards import discover_shards, read_annotations, read_shard_codes, write_annotation_shard


def assert_matches_reference(counts: Counts, shard_paths) -> None:
    labels, label_counts, pairs, n = reference_counts(shard_paths)
    assert counts.labels.tolist() == labels  # count_shards returns the sorted vocabulary
    assert counts.n_examples == n
    np.testing.assert_array_equal(counts.label_counts, label_counts)
    dense = counts.pairs.toarray()
    np.testing.assert_array_equal(np.triu(dense, 1), dense)  # pairs stored once, i < j
    np.testing.assert_array_equal(dense + dense.T, pairs)


@pytest.mark.parametrize("dataset", ["bibtex", "delicious", "eurlex"])
def test_counts_equal_scipy_reference_on_real_data(dataset, data_dir):
    paths = discover_shards([data_dir / dataset])
    result = count_shards(paths)
    assert not result.rejected
    assert_matches_reference(result.counts, paths)


@pytest.mark.parametrize("block", [7, 1000, 1 << 22])
@pytest.mark.parametrize("dataset", ["bibtex", "delicious"])
def test_pair_enumeration_equals_the_sparse_product(dataset, block, data_dir):
    """The direct pair count against scipy's triu(Y.T @ Y), in one block or in many (tiny blocks split anywhere)."""
    for path in discover_shards([data_dir / dataset]):
        ann = read_annotations(path)
        m = len(ann.labels)
        y = sp.csr_matrix((np.ones(ann.example_codes.size), (ann.example_codes, ann.label_codes)), (ann.n_examples, m))
        expected = sp.triu(y.T @ y, k=1).tocsr()
        got = upper_pair_counts(ann.example_codes, ann.label_codes, m, block=block)
        assert got.has_canonical_format and (got != expected).nnz == 0


@st.composite
def examples(draw):
    """Distinct sorted label codes per example, some examples far larger than SMALL_EXAMPLE."""
    m = draw(st.integers(2, 3000))
    sizes = draw(st.lists(st.one_of(st.integers(1, 8), st.integers(30, 90)), min_size=1, max_size=40))
    sizes = [min(size, m) for size in sizes]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    labels = [np.sort(rng.choice(m, size, replace=False)) for size in sizes]
    example_codes = np.repeat(np.arange(len(sizes)), sizes)
    return example_codes, np.concatenate(labels), m


@pytest.mark.parametrize("dense_cells", [0, 1 << 30])  # keys sorted, or counted in one histogram
@pytest.mark.parametrize("small_example", [0, 3, 32])  # which examples go by columns, which by the general path
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=examples(), block=st.sampled_from([1, 5, 100, 1 << 21]))
def test_pair_counts_equal_the_sparse_product_for_any_examples(monkeypatch, dense_cells, small_example, case, block):
    monkeypatch.setattr(cooccurrence, "DENSE_CELLS", dense_cells)
    monkeypatch.setattr(cooccurrence, "SMALL_EXAMPLE", small_example)
    example_codes, label_codes, m = case
    y = sp.csr_matrix((np.ones(label_codes.size), (example_codes, label_codes)), (example_codes.max() + 1, m))
    expected = sp.triu(y.T @ y, k=1).tocsr()
    got = upper_pair_counts(example_codes.astype(np.int32), label_codes.astype(np.int32), m, block=block)
    # int32 counts: a pair is counted at most once per example, and these examples are far fewer than 2^31
    assert got.dtype == np.int32 and got.has_canonical_format and (got != expected).nnz == 0


@pytest.mark.parametrize("dense_cells", [0, 1 << 30])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=examples(), block=st.sampled_from([3, 100, 1 << 21]), seed=st.integers(0, 2**32 - 1))
def test_pair_counter_fed_shard_by_shard_equals_one_pass(monkeypatch, dense_cells, case, block, seed):
    """A count task feeds its counter one shard at a time, each shard's examples numbered from 0: the sum over
    parts cut at random example boundaries is the count of the whole."""
    monkeypatch.setattr(cooccurrence, "DENSE_CELLS", dense_cells)
    example_codes, label_codes, m = case
    n = int(example_codes.max()) + 1
    cuts = np.sort(np.random.default_rng(seed).choice(n + 1, min(n + 1, 4), replace=False))
    counter = cooccurrence.PairCounter(m, max_examples=n, block=block)
    for lo, hi in itertools.pairwise([0, *cuts.tolist(), n]):
        part = (example_codes >= lo) & (example_codes < hi)
        counter.add((example_codes[part] - lo).astype(np.int32), label_codes[part].astype(np.int32))
    whole = upper_pair_counts(example_codes, label_codes, m, block=block)
    got = counter.result()
    assert got.has_canonical_format and (got != whole).nnz == 0


@pytest.mark.parametrize("keys", [[], [7], [3, 3, 3], [1, 2, 2, 5, 9, 9, 9], list(range(50))])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_distinct_counts_equal_numpy_unique(keys, dtype):
    sorted_keys = np.asarray(keys, np.int64)
    distinct, counts = cooccurrence._distinct_counts(sorted_keys, dtype)
    expected, expected_counts = np.unique(sorted_keys, return_counts=True)
    assert counts.dtype == dtype
    np.testing.assert_array_equal(distinct, expected)
    np.testing.assert_array_equal(counts, expected_counts)


def resplit(paths, out_dir, n_shards):
    """The same examples written as ``n_shards`` shards of unequal sizes."""
    ids, labels = [], []
    for path in paths:
        table = pq.read_table(path).to_pydict()
        ids += table["example_id"]
        labels += table["labels"]
    cuts = np.sort(np.random.default_rng(n_shards).choice(np.arange(1, len(ids)), n_shards - 1, replace=False))
    bounds = [0, *cuts.tolist(), len(ids)]
    return [
        write_annotation_shard(out_dir / f"part-{i:03d}.parquet", ids[a:b], labels[a:b])
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]


@pytest.mark.parametrize("n_shards", [1, 7])
def test_counts_do_not_depend_on_how_shards_are_split(n_shards, eurlex_dir, tmp_path):
    original = discover_shards([eurlex_dir])
    split = resplit(original, tmp_path, n_shards)
    a, b = count_shards(original).counts, count_shards(split).counts
    assert a.labels.tolist() == b.labels.tolist()
    assert a.equals(b) and a.n_examples == 19577


@pytest.mark.parametrize("workers", [1, 2])
def test_dask_counts_equal_in_process_counts(workers, dask_clients, eurlex_dir):
    paths = discover_shards([eurlex_dir])
    local = count_shards(paths).counts
    seen = []
    distributed = count_shards(paths, dask_clients[workers], progress=lambda d, t: seen.append((d, t))).counts
    assert local.pairs.dtype == distributed.pairs.dtype == np.int64  # int32 only inside the count
    assert distributed.labels.tolist() == local.labels.tolist()
    assert distributed.equals(local) and distributed.manifest == local.manifest
    assert seen[-1] == (len(paths), len(paths))


@pytest.mark.timeout(120)
def test_counting_waits_on_its_own_client_not_dasks_default(dask_clients, eurlex_dir):
    """Counting on a client while Dask's default client is one that never connected (Dask registers a client as
    the default before it connects, and a failed one stays so until collected). Dask's ``as_completed`` waits on
    the default client's event loop unless told otherwise: that idle loop missed the futures finishing, and the
    count waited forever (a CI run hung so)."""
    from distributed import Client

    paths = discover_shards([eurlex_dir])
    with pytest.raises(ValueError):
        Client("tcp://127.0.0.1:notaport", timeout="5s")
    gc.disable()  # keep the failed client alive, as a busy process may for a while
    try:
        counts = count_shards(paths, dask_clients[2]).counts
    finally:
        gc.enable()
    assert counts.equals(count_shards(paths).counts)


def test_partial_sums_stay_on_the_worker_that_made_them(eurlex_dir, tmp_path):
    """Each worker merges the batches it counted: no partial sum moves between workers batch after batch. The last
    merges are tiled: each worker's sum is cut into one row range per worker, and each range is summed on its own
    worker, so that both share the final sum. Work stealing is off so that Dask cannot move a merge that our
    placement put where its inputs are."""
    import dask
    from distributed import get_task_stream

    from pmi_pipeline.dask_cluster import dask_client

    # 15 batches: however the workers share them, their binary counters hold 3 partial sums or more between them
    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 15)
    with dask.config.set({"distributed.scheduler.work-stealing": False}), dask_client(n_workers=2) as client:
        with get_task_stream(client) as stream:
            result = count_shards(paths, client, batch_bytes=1)  # a batch per shard
    tasks = {
        kind: [t for t in stream.data if t["key"].startswith(kind)] for kind in ("_merge_pair", "_tile-", "_merge_tile")
    }
    moved = [t for t in tasks["_merge_pair"] if any(s["action"] == "transfer" for s in t["startstops"])]
    parts = len(tasks["_tile-"]) // 2  # partial sums left on the workers, each cut in 2
    assert moved == [] and parts == 2  # one per worker
    assert len(tasks["_merge_pair"]) + parts == 15  # every batch folded into one of them
    assert len(tasks["_merge_tile"]) == 2 * (parts - 1)
    assert len({t["worker"] for t in tasks["_merge_tile"]}) == 2
    assert result.counts.equals(count_shards(paths).counts)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_row_ranges_add_up_to_the_counts(n, eurlex_dir):
    """The final sum's row ranges (_row_cuts, _tile): disjoint, about equal in pairs, summing to the whole."""
    counts = count_shards(discover_shards([eurlex_dir])).counts
    cuts = cooccurrence._row_cuts(counts, n)
    tiles = [cooccurrence._tile(counts, cuts, r) for r in range(n)]
    assert len(cuts) == n - 1 and cuts == sorted(cuts)
    assert sum(t.n_pairs for t in tiles) == counts.n_pairs
    widest_row = int(np.diff(counts.pairs.indptr).max())
    assert max(t.n_pairs for t in tiles) <= counts.n_pairs / n + widest_row
    assert Counts.sum(tiles).equals(counts) and Counts.sum(tiles).manifest == counts.manifest


def test_three_workers_share_the_final_sum(eurlex_dir, tmp_path):
    """Three row ranges, summed on three workers and put together in the client, give the in-process counts."""
    from distributed import get_task_stream

    from pmi_pipeline.dask_cluster import dask_client

    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 12)
    with dask_client(n_workers=3, processes=False) as client, get_task_stream(client) as stream:
        result = count_shards(paths, client, batch_bytes=1)
    tiles = [t for t in stream.data if t["key"].startswith("_tile-")]
    counted_on = {t["worker"] for t in stream.data if t["key"].startswith("count-batch")}
    assert len(counted_on) >= 2 and tiles and len(tiles) % len(counted_on) == 0  # each partial sum cut in as many
    local = count_shards(paths).counts
    assert result.counts.labels.tolist() == local.labels.tolist() and result.counts.equals(local)
    assert result.counts.manifest == local.manifest and result.counts.n_examples == local.n_examples


def test_bad_shard_is_rejected_and_others_go_on(eurlex_dir, tmp_path, dask_clients):
    paths = discover_shards([eurlex_dir])
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    for client in (None, dask_clients[2]):
        result = count_shards([*paths, bad], client)
        assert [e.path for e in result.rejected] == [str(bad)]
        assert result.counts.equals(count_shards(paths).counts)


def test_merge_is_additive_and_order_free(eurlex_dir):
    parts = [count_shards([p]).counts for p in discover_shards([eurlex_dir])]
    forward = Counts.sum(parts).sorted()
    backward = Counts.sum(parts[::-1]).sorted()
    assert forward.labels.tolist() == backward.labels.tolist() and forward.equals(backward)
    assert forward.n_examples == sum(p.n_examples for p in parts)
    with pytest.raises(ValueError, match="counted twice"):
        parts[0].merge(parts[0])


def test_a_merge_widens_pair_counts_before_they_could_overflow():
    """Pair counts are int32 inside a count; a merge whose examples reach 2^31 adds them as int64, so that no
    count wraps around (a pair is counted at most once per example)."""
    labels = np.array(["a", "b"], dtype=object)

    def counts(n_pair, n_examples, shard):
        pairs = sp.csr_matrix((np.array([n_pair], np.int32), np.array([1]), np.array([0, 1, 1])), shape=(2, 2))
        return Counts(labels, np.array([n_pair, n_pair]), pairs, n_examples, {shard: {}})

    small = counts(3, 4, "x").merge(counts(2, 5, "y"), sorted_union=True)
    assert small.pairs.dtype == np.int32 and small.pairs[0, 1] == 5
    big = counts(2**31 - 2, 2**31 - 2, "x").merge(counts(2, 2, "y"), sorted_union=True)
    assert big.pairs.dtype == np.int64 and big.pairs[0, 1] == 2**31
    assert Counts.sum([counts(3, 4, "x"), counts(2, 5, "y")]).pairs.dtype == np.int64


@pytest.mark.parametrize("grow_by_sorting", [0.0, 0.25, np.inf])
@pytest.mark.parametrize("seed", range(4))
def test_a_run_vocabulary_grows_sorted_and_locates_every_label(seed, grow_by_sorting, monkeypatch):
    """A run's vocabulary in a process (_RunVocabularies): sorted and distinct, every label of every dictionary
    looked up where it is, the same array while no new label comes, and runs kept apart; whether it grows by
    sorting again (``grow_by_sorting`` 0), by inserting new labels where they belong (inf), or either. The labels
    mix scripts, so that the order of Python's comparisons (inserting) must agree with Arrow's (sorting)."""
    import pyarrow as pa

    monkeypatch.setattr(cooccurrence, "GROW_BY_SORTING", grow_by_sorting)
    rng = np.random.default_rng(seed)
    stems = ["label", "Label", "étiquette", "метка", "标签", "ラベル", "\U0001f3f7 tag", "a b", "z"]
    names = np.array([f"{stems[i % len(stems)]} {i:03d}" for i in rng.permutation(300)], dtype=object)
    vocabularies = cooccurrence._RunVocabularies()
    seen: set[str] = set()
    previous = None
    for step in range(12):
        pool = names[: 60 + 20 * step] if step < 8 else names  # new labels come early, then none
        dictionaries = [pa.array(rng.choice(pool, size=int(rng.integers(1, 40)), replace=False).tolist())]
        dictionaries.append(pa.array(rng.choice(pool, size=5, replace=False).tolist(), pa.large_string()))
        labels, positions = vocabularies.get("run").locate(dictionaries)
        seen |= {x for d in dictionaries for x in d.to_pylist()}
        assert labels.tolist() == sorted(seen)
        for d, position in zip(dictionaries, positions, strict=True):
            assert labels[position].tolist() == d.to_pylist()
        if previous is not None and len(previous) == len(labels):
            assert labels is previous
        previous = labels
    other, _ = vocabularies.get("other run").locate([pa.array(["zz"])])
    assert other.tolist() == ["zz"]
    grown = vocabularies.get("run").locate([pa.array(["zz"])])[0].tolist()
    assert grown == sorted([*seen, "zz"])
    for run in range(cooccurrence._RunVocabularies.KEEP + 2):
        vocabularies.get(f"run {run}").locate([pa.array(["a"])])
    assert len(vocabularies._runs) == cooccurrence._RunVocabularies.KEEP
    vocabularies.forget(f"run {cooccurrence._RunVocabularies.KEEP + 1}")
    assert f"run {cooccurrence._RunVocabularies.KEEP + 1}" not in vocabularies._runs


@pytest.mark.parametrize("kept", [(0, 1, 2, 3), (0, 3), (0, 2), (1, 3)])
def test_counts_move_to_a_later_version_of_a_vocabulary_without_uniting_labels(kept, monkeypatch):
    """Versions of a run's vocabulary, some let go (only those in ``kept`` live on): uniting a version with a
    later one finds where its labels went by composing the growth moves (no labels hashed or sorted), Counts
    merged over two versions equal those merged by uniting labels, and nothing is left once every version is
    gone."""
    import pyarrow as pa

    rng = np.random.default_rng(len(kept))
    names = [f"label {i:04d}" for i in rng.permutation(1000)]
    recorded = set(cooccurrence._GROWTH._parent)
    vocabulary = cooccurrence._Vocabulary()
    versions = []
    for size in (100, 130, 400, 1000):  # the second grows by insertion, the others by sorting again
        versions.append(vocabulary.locate([pa.array(names[:size])])[0])
    assert len({id(v) for v in versions}) == 4
    versions = {i: v for i, v in enumerate(versions) if i in kept}
    gc.collect()

    def counts(labels):
        m = labels.size
        pairs = sp.triu(sp.random(m, m, density=0.05, random_state=m, format="csr") * 10, k=1).astype(np.int32)
        return Counts(labels, np.arange(m), pairs.tocsr(), 1, {f"shard {m}": {}})

    first, last = versions[kept[0]], versions[kept[-1]]
    expected = counts(first).merge(counts(np.array(last.tolist(), dtype=object)), sorted_union=True)
    monkeypatch.setattr(cooccurrence, "_sorted_union_many", None)  # any uniting of labels would fail
    for a, b in itertools.permutations([first, last]):
        labels, position_a, position_b = cooccurrence._sorted_union(a, b)
        assert labels is last
        assert labels[position_a].tolist() == a.tolist() and labels[position_b].tolist() == b.tolist()
    merged = counts(first).merge(counts(last), sorted_union=True)
    assert merged.labels is last and merged.equals(expected)
    monkeypatch.undo()
    del versions, first, last, labels, merged, expected, vocabulary, a, b
    gc.collect()
    assert set(cooccurrence._GROWTH._parent) <= recorded


def test_letting_a_first_version_go_leaves_no_record_naming_it():
    """A run's first vocabulary is spliced out as it is let go, like the versions grown from it: no record names
    its id afterwards, where a later version given that id would take its place (and have its moves composed
    with those of versions it never grew into)."""
    import pyarrow as pa

    vocabulary = cooccurrence._Vocabulary()
    first = vocabulary.locate([pa.array([f"label {i:03d}" for i in range(0, 200, 2)])])[0]
    grown = vocabulary.locate([pa.array(["label 001"])])[0]  # inserted: a version grown from the first
    parents = {key: entry[0] for key, entry in cooccurrence._GROWTH._parent.items()}
    assert parents[id(grown)] == id(first)
    key = id(first)
    del first
    gc.collect()
    assert key not in {entry[0] for entry in cooccurrence._GROWTH._parent.values()}
    assert key not in cooccurrence._GROWTH._watched
    assert cooccurrence._sorted_union(grown, np.array(["label 001"], dtype=object))[0].tolist() == grown.tolist()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_count_is_over_its_own_labels_and_leaves_no_vocabulary_behind(workers, dask_clients, data_dir):
    """Counts of one corpus, then of another, in the same process (the one worker, or this process): the second
    holds the second corpus's labels only, and no run's vocabulary stays in a worker once its count is done."""
    client = dask_clients[workers] if workers else None
    for dataset in ("bibtex", "eurlex"):
        paths = discover_shards([data_dir / dataset])
        counts = count_shards(paths, client).counts
        assert_matches_reference(counts, paths)
        kept = client.run(lambda: len(cooccurrence._RUN_VOCABULARIES._runs)) if client else {"here": 0}
        assert set(kept.values()) == {0} and not cooccurrence._RUN_VOCABULARIES._runs


def test_a_merge_reuses_a_vocabulary_only_where_it_is_the_sorted_union(eurlex_dir):
    """Two counts over one vocabulary merge without uniting them; the union is one side's own array where that
    side is sorted and holds the other's labels, never an unsorted one of the same labels."""
    first, second = (count_shard(p) for p in discover_shards([eurlex_dir])[:2])
    expected = Counts.sum([first, second])
    union = expected.labels
    a, b = first.reindex(union), second.reindex(union.copy())
    merged = a.merge(b, sorted_union=True)
    assert merged.labels is a.labels and merged.equals(expected)
    grown = first.merge(b, sorted_union=True)  # b's vocabulary holds first's labels
    assert grown.labels is b.labels and grown.equals(expected)
    shuffled = b.reindex(union[np.random.default_rng(0).permutation(union.size)])
    merged = first.merge(shuffled, sorted_union=True)
    assert merged.labels.tolist() == sorted(union.tolist()) and merged.equals(expected)
    assert (merged.pairs != expected.pairs).nnz == 0
    order = np.random.default_rng(1).permutation(union.size)  # one unsorted vocabulary on both sides
    merged = first.reindex(union[order]).merge(second.reindex(union[order]), sorted_union=True)
    assert merged.labels.tolist() == sorted(union.tolist()) and merged.equals(expected)


@pytest.mark.parametrize("repeats", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_both_ways_of_uniting_labels_give_the_sorted_union(seed, repeats):
    """``_sorted_union_arrow`` either hashes then sorts the distinct labels (``repeats``) or sorts all labels and
    drops those next to an equal one: the same union, in Python's order of ``str`` (code points), and the same
    positions, whether the arrays are sorted vocabularies, unsorted, repeat labels or are empty."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    stems = ["label", "Label", "étiquette", "метка", "标签", "\U0001f3f7 tag", "a b", "z", "é"]
    names = np.array([f"{stems[i % len(stems)]}{i:02d}" for i in range(90)] + stems, dtype=object)
    arrays = [
        np.array(sorted(set(rng.choice(names, 40).tolist())), dtype=object),  # a vocabulary
        np.array(sorted(set(rng.choice(names, 60).tolist())), dtype=object),
        rng.choice(names, 30),  # unsorted, with repeats
        pa.array(rng.choice(names, 20).tolist()),  # Arrow, not large strings
        np.empty(0, dtype=object),
    ]
    labels, positions = cooccurrence._sorted_union_arrow(arrays, repeats=repeats)
    union = sorted({str(x) for a in arrays for x in (a.to_pylist() if isinstance(a, pa.Array) else a.tolist())})
    assert labels.type == pa.large_string() and labels.to_pylist() == union
    for a, position in zip(arrays, positions, strict=True):
        values = a.to_pylist() if isinstance(a, pa.Array) else a.tolist()
        assert position.dtype == np.int64 and np.asarray(union, dtype=object)[position].tolist() == values
    other_labels, other_positions = cooccurrence._sorted_union_arrow(arrays, repeats=not repeats)
    assert other_labels.equals(labels)
    assert all(np.array_equal(a, b) for a, b in zip(positions, other_positions, strict=True))


def test_counts_pickle_with_their_labels_as_arrow_strings(eurlex_dir, monkeypatch):
    """Counts travel between Dask workers pickled: the labels go as Arrow strings and come back as the same
    Python strings, with every count, and the Arrow form is kept with the unpickled vocabulary (pickling it again
    or uniting it converts nothing) until that vocabulary is let go."""
    import pickle

    import pyarrow as pa

    counts = count_shard(discover_shards([eurlex_dir])[0])
    loaded = pickle.loads(pickle.dumps(counts, protocol=5))
    assert loaded.equals(counts) and loaded.labels.tolist() == counts.labels.tolist()
    assert loaded.labels.dtype == object and all(type(x) is str for x in loaded.labels)
    assert loaded.pairs.dtype == counts.pairs.dtype and loaded.n_examples == counts.n_examples
    assert loaded.manifest == counts.manifest
    with monkeypatch.context() as patched:
        patched.setattr(pa, "array", None)  # any conversion of Python strings would fail
        kept = cooccurrence._ARROW_LABELS.get(loaded.labels)
        assert cooccurrence._ARROW_LABELS.get(loaded.labels) is kept
    assert kept.to_pylist() == counts.labels.tolist()
    assert pickle.loads(pickle.dumps(Counts.empty())).n_labels == 0
    key = id(loaded.labels)
    del loaded
    gc.collect()
    assert key not in cooccurrence._ARROW_LABELS._arrow


def test_save_load_round_trip(bibtex_dir, tmp_path):
    counts = count_shards(discover_shards([bibtex_dir])).counts
    loaded = Counts.load(counts.save(tmp_path / "counts.npz"))
    assert loaded.labels.tolist() == counts.labels.tolist() and loaded.equals(counts)
    assert loaded.manifest == counts.manifest


@pytest.mark.parametrize("n", [1, 2, 7, 8, 13])
def test_running_sum_holds_one_partial_per_size_class(n, bibtex_dir):
    """Shards are summed as they arrive: after n shards, popcount(n) partial sums wait, never all n."""
    from pmi_pipeline.cooccurrence import _RunningSum, count_shard

    shard = count_shard(discover_shards([bibtex_dir])[0])
    running = _RunningSum(None)
    for i in range(n):
        running.add(Counts(shard.labels, shard.label_counts, shard.pairs, shard.n_examples, {f"s{i}": {}}))
    assert len(running.stack) == bin(n).count("1")
    total = running.result()
    assert total.n_examples == n * shard.n_examples and (total.pairs != shard.pairs * n).nnz == 0


@pytest.mark.parametrize("batch_bytes", [1, 1 << 40])
@pytest.mark.parametrize("dataset", ["delicious", "eurlex"])
def test_batched_counts_equal_the_reference(dataset, batch_bytes, data_dir, tmp_path):
    """Shards counted one per batch, or all in one batch (one vocabulary, one pass over the pairs)."""
    paths = resplit(discover_shards([data_dir / dataset]), tmp_path, 5)
    result = count_shards(paths, batch_bytes=batch_bytes)
    assert_matches_reference(result.counts, paths)
    assert sorted(e["path"] for e in result.counts.manifest.values()) == sorted(map(str, paths))


def test_a_bad_shard_costs_its_batch_nothing(eurlex_dir, tmp_path, dask_clients):
    """A bad shard inside a batch is rejected on its own; the batch's other shards are counted."""
    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 4)
    bad = tmp_path / "part-001a.parquet"  # sorts between the others: in the middle of the batch
    bad.write_bytes(b"not parquet at all")
    every = sorted([*paths, bad])
    counts, outcomes = count_batch(every)
    assert [isinstance(o, ShardError) for o in outcomes] == [p == bad for p in every]
    assert counts.equals(count_shards(paths).counts)
    for client in (None, dask_clients[2]):
        result = count_shards(every, client, batch_bytes=1 << 40)
        assert [e.path for e in result.rejected] == [str(bad)]
        assert result.counts.equals(count_shards(paths).counts) and len(result.example_ids) == len(paths)


def test_a_batch_lets_go_of_each_shard_once_copied(eurlex_dir, tmp_path):
    """count_batch hands its shards over to be counted: each is dropped once its codes are in the batch's, so no
    shard's codes are held twice. Shards as read (labels not yet sorted) count the same as shards in their own
    sorted vocabularies; counts_from_batch leaves the caller's list alone."""
    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 4)
    anns = [read_annotations(p) for p in paths]
    given = list(anns)
    expected = cooccurrence.counts_from_batch(anns)
    assert len(anns) == len(given) and all(a is b for a, b in zip(anns, given, strict=True))
    handed_over = [read_shard_codes(p) for p in paths]
    assert cooccurrence._count_consumed(handed_over).equals(expected) and handed_over == []
    assert_matches_reference(expected.sorted(), paths)


@pytest.mark.parametrize("alone", [True, False])
@pytest.mark.parametrize("met", [True, False])
def test_a_count_task_holds_one_shard_at_a_time_once_its_labels_are_met(met, alone, eurlex_dir, tmp_path, monkeypatch):
    """With a run whose vocabulary holds the batch's labels (``met``), count_batch reads a shard only once the
    shard before it is counted and let go: a task's working memory is one shard's codes however many shards its
    batch has (docs/performance.md, tenth pass). Shards with labels the run lacks wait for the vocabulary to grow
    once for them all, so they are all held. So do all shards where the vocabulary is too large to look up
    ``alone`` (over LOOKUP_ALONE_LABELS): one lookup, one hash of the vocabulary, for them all (thirteenth pass)."""
    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 5)
    read, shards, held = cooccurrence.read_shard_codes, [], []
    monkeypatch.setattr(cooccurrence, "LOOKUP_ALONE_LABELS", 10**6 if alone else -1)
    lookup, lookups = cooccurrence._Vocabulary.lookup, []

    def lookup_and_count(self, strings):
        lookups.append(len(strings))
        return lookup(self, strings)

    def read_and_watch(path, **kwargs):
        gc.collect()
        held.append(sum(shard() is not None for shard in shards))  # shards read before this one, still alive
        shard = read(path, **kwargs)
        shards.append(weakref.ref(shard))
        return shard

    run = "test-run"
    try:
        if met:
            cooccurrence._RUN_VOCABULARIES.get(run).locate([read_annotations(p).labels for p in paths])
        monkeypatch.setattr(cooccurrence, "read_shard_codes", read_and_watch)
        monkeypatch.setattr(cooccurrence._Vocabulary, "lookup", lookup_and_count)
        counts, outcomes = count_batch(paths, run=run)
    finally:
        cooccurrence._forget_run_vocabulary(run)
    assert held == ([0] * len(paths) if met and alone else list(range(len(paths)))) and len(outcomes) == len(paths)
    # shard by shard (alone), and the shards that waited at once
    assert len(lookups) == (len(paths) + (not met) if alone else 1)
    assert lookups[-1] == sum(len(read_annotations(p).labels) for p in paths[-1 if alone and met else 0 :])
    assert_matches_reference(counts, paths)
    assert [e["path"] for e in counts.manifest.values()] == [str(p) for p in paths]  # in the batch's order


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a directory no one can write to: Linux's /proc")
def test_a_count_task_sends_the_fingerprints_it_cannot_write(eurlex_dir, tmp_path, caplog):
    """A directory the task's process sees but cannot write to (another user's, or a full disk): the fingerprints
    come back with the outcomes instead, and the count goes on."""
    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 3)
    counts, outcomes = count_batch(paths, fingerprints_to="/proc")  # even root cannot create files there
    assert [type(ids) for _, ids in outcomes] == [np.ndarray] * len(paths)
    for path, (_, ids) in zip(paths, outcomes, strict=True):
        np.testing.assert_array_equal(ids, read_shard_codes(path).example_ids)
    assert "cannot write example-id fingerprints to /proc/" in caplog.text
    assert_matches_reference(counts, paths)


@pytest.mark.parametrize("reachable", [True, False])
def test_a_count_task_writes_each_shards_fingerprints_as_it_reads_it(reachable, eurlex_dir, tmp_path, monkeypatch):
    """Given a directory it can reach, count_batch writes each shard's example-id fingerprints there once the
    shard is read, and holds none of them until the batch ends (docs/performance.md, eleventh pass);
    FingerprintFiles takes them from there and removes the task's file. Where the directory is not there (a
    worker on another machine than the client's), they come back with the outcomes, as arrays."""
    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 5)
    read, fingerprints, held = cooccurrence.read_shard_codes, [], []

    def read_and_watch(path, **kwargs):
        gc.collect()
        held.append(sum(ids() is not None for ids in fingerprints))  # earlier shards' fingerprints, still alive
        shard = read(path, **kwargs)
        fingerprints.append(weakref.ref(shard.example_ids))
        return shard

    files, run = FingerprintFiles(), "test-run"
    to = files.directory if reachable else str(tmp_path / "elsewhere")
    try:  # the run has met the batch's labels: no shard waits for its vocabulary to grow (held with its ids)
        cooccurrence._RUN_VOCABULARIES.get(run).locate([read_annotations(p).labels for p in paths])
        monkeypatch.setattr(cooccurrence, "read_shard_codes", read_and_watch)
        counts, outcomes = count_batch(paths, run=run, fingerprints_to=to)
    finally:
        cooccurrence._forget_run_vocabulary(run)
        monkeypatch.undo()
    assert held == ([0] * len(paths) if reachable else list(range(len(paths))))
    kinds = {type(ids) for _, ids in outcomes}
    assert kinds == ({StoredFingerprints} if reachable else {np.ndarray})
    for sha, ids in outcomes:
        files.add(sha, ids)
    files.release(ids for _, ids in outcomes)
    assert os.listdir(files.directory) == []
    for path, (sha, _) in zip(paths, outcomes, strict=True):
        np.testing.assert_array_equal(files[sha], read_shard_codes(path).example_ids)
    assert_matches_reference(counts, paths)


def test_counts_take_every_shards_fingerprints_on_a_cluster(eurlex_dir, tmp_path, dask_clients):
    """The example ids a count hands on (for the store's index and the repeat check) are every counted shard's,
    in process and from a LocalCluster's workers, which write them where the client reads them; the directory
    for them is gone once the count is."""
    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 6)
    expected = {s.sha256: s.example_ids for s in map(read_shard_codes, paths)}
    for client in (None, dask_clients[2]):
        result = count_shards(paths, client, batch_bytes=1)
        assert sorted(result.example_ids) == sorted(expected)
        for sha, ids in expected.items():
            np.testing.assert_array_equal(result.example_ids[sha], ids)
        assert not os.path.exists(result.example_ids.directory)


@pytest.mark.parametrize("widen", [False, True])
@pytest.mark.parametrize("grow", [True, False])
def test_a_batch_counts_the_same_as_the_run_vocabulary_grows_or_its_counts_widen(
    grow, widen, eurlex_dir, tmp_path, monkeypatch
):
    """A batch of a run after another batch of it: with ``grow``, the run has met the labels of the batch's second
    shard only, so that shard is counted first and the others wait (the vocabulary grows once, and the counts
    so far are moved to it), else the run met them all before; with ``widen``, int32 pair counts run out after
    the first shard counted (the limit lowered to its examples), int64 from there on. Each batch is over the
    run's whole vocabulary, in the shards' order, and their sum is the reference's."""
    paths = resplit(discover_shards([eurlex_dir]), tmp_path, 6)
    shards = [read_annotations(p) for p in paths]
    seen = set(shards[0].labels.to_pylist())
    for shard in shards[1:]:  # every shard brings new labels
        assert set(shard.labels.to_pylist()) - seen
        seen |= set(shard.labels.to_pylist())
    if widen:
        monkeypatch.setattr(cooccurrence, "_INT32_EXAMPLES", shards[2 if grow else 1].n_examples)
    run = "test-run"
    try:
        cooccurrence._RUN_VOCABULARIES.get(run).locate([s.labels for s in ([shards[0], shards[2]] if grow else shards)])
        first, _ = count_batch(paths[:1], run=run)
        second, _ = count_batch(paths[1:], run=run)
        labels = cooccurrence._RUN_VOCABULARIES.get(run).labels
    finally:
        cooccurrence._forget_run_vocabulary(run)
    assert labels.tolist() == sorted(seen) and second.labels is labels
    assert (first.labels is labels) is not grow  # the same array while the vocabulary does not grow
    assert [e["path"] for e in second.manifest.values()] == [str(p) for p in paths[1:]]
    assert second.pairs.dtype == (np.int64 if widen else np.int32) and second.pairs.has_canonical_format
    expected = count_shards(paths[1:]).counts.reindex(labels)  # the first batch's labels with zero counts
    assert second.n_examples == expected.n_examples and second.manifest.keys() == expected.manifest.keys()
    np.testing.assert_array_equal(second.label_counts, expected.label_counts)
    assert (second.pairs != expected.pairs).nnz == 0
    assert_matches_reference(first.merge(second, sorted_union=True), paths)


def test_the_same_shard_twice_in_a_batch_is_refused(bibtex_dir, tmp_path):
    path = discover_shards([bibtex_dir])[0]
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="counted twice"):
        count_batch([path, copy])


@pytest.mark.parametrize("slots", [1, 2, 8])
@pytest.mark.parametrize("sizes", [[5] * 40, [1, 30, 2, 2, 9, 40, 1, 1, 1, 3], [7], []])
def test_batches_are_consecutive_capped_and_enough_for_every_worker(sizes, slots):
    cap = 12
    batches = plan_batches(sizes, slots, cap)
    assert [i for b in batches for i in b] == list(range(len(sizes)))  # every shard once, in order
    for b in batches:
        assert len(b) == 1 or sum(sizes[i] for i in b) <= cap  # over the cap only as a single shard
    if sizes:
        target = min(cap, sum(sizes) / (BATCHES_PER_SLOT * slots))
        # a batch is closed only when the next shard would overflow the target
        for b, nxt in itertools.pairwise(batches):
            assert sum(sizes[i] for i in b) + sizes[nxt[0]] > target


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"])
def test_local_workers_get_the_malloc_settings(dask_clients, name):
    """Workers of our LocalCluster allocate large arrays from the heap and keep what they free for the next shard
    (dask_cluster.WORKER_MALLOC): with Dask's nanny settings, counting was 1.16x slower (bench/worker_malloc.py),
    and 2-worker counts at 10^3 labels 1.24x slower again (docs/performance.md, eighth pass). One arena for all
    of a worker's threads: 7% off the tree's peak at 10^8 annotations (eleventh pass)."""
    import os

    from pmi_pipeline.dask_cluster import WORKER_MALLOC

    value = WORKER_MALLOC[f"distributed.nanny.pre-spawn-environ.{name}"]
    for client in dask_clients.values():
        seen = client.run(lambda: os.environ.get(name))
        assert set(seen.values()) == {str(value)}


def test_local_workers_read_parquet_with_the_system_allocator(dask_clients):
    """Workers of our LocalCluster give Arrow's buffers back to glibc (dask_cluster.WORKER_ARROW_POOL): with
    pyarrow's mimalloc a counting worker peaked about 30 MiB higher (docs/performance.md, eighth pass)."""

    def backend() -> str:
        import pyarrow

        return pyarrow.default_memory_pool().backend_name

    for client in dask_clients.values():
        assert set(client.run(backend).values()) == {"system"}


def test_local_workers_do_not_profile(dask_clients):
    """Dask's statistical profiler is off on our LocalCluster's workers (dask_cluster.WORKER_PROFILE): its samples
    every 10 ms take the GIL from the count tasks, which ran about 15% slower with it (docs/performance.md)."""
    for client in dask_clients.values():
        seen = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        assert set(seen.values()) == {False}


@pytest.mark.parametrize(
    ("callback", "setting", "dask_ms"), [("tick", "tick.interval", 20), ("memory_monitor", "monitor-interval", 100)]
)
def test_local_cluster_checks_its_event_loops_less_often(dask_clients, callback, setting, dask_ms):
    """The scheduler, nannies and workers of our LocalCluster check their event loops and memory every 500 ms,
    not every 20 and 100 ms (dask_cluster.QUIET_EVENT_LOOPS): idle, those checks took 12-13% of a core
    (bench/idle_cluster.py), and the workers' take the GIL from the count tasks."""
    from pmi_pipeline.dask_cluster import QUIET_EVENT_LOOPS

    key = next(k for k in QUIET_EVENT_LOOPS if k.endswith(setting))
    ms = dask.utils.parse_timedelta(QUIET_EVENT_LOOPS[key], default="ms") * 1000
    assert ms > dask_ms  # Dask's default

    def interval(dask_worker) -> float:
        return dask_worker.periodic_callbacks[callback].callback_time

    for client in dask_clients.values():
        for nanny in (False, True):
            assert set(client.run(interval, nanny=nanny).values()) == {ms}
        if callback == "tick":
            assert client.run_on_scheduler(lambda dask_scheduler: interval(dask_scheduler)) == ms


@pytest.mark.parametrize(("dense_cells", "trims"), [(1 << 30, 1), (0, 0)])  # pair histogram, or sparse parts
def test_a_batch_hands_its_heap_back_only_where_pairs_go_into_a_histogram(monkeypatch, dense_cells, trims, bibtex_dir):
    """Over many labels a batch's working memory is what the next batch needs again: handed back only when the
    run's tasks are done (twelfth pass)."""
    monkeypatch.setattr(cooccurrence, "DENSE_CELLS", dense_cells)
    calls = []
    monkeypatch.setattr(cooccurrence, "_release_free_heap", lambda: calls.append(1))
    counts, _ = count_batch(discover_shards([bibtex_dir])[:2], run="trim-test")
    assert counts.n_labels > 1 and len(calls) == trims
    cooccurrence._forget_run_vocabulary("trim-test")
    assert len(calls) == trims + 1
