"""The composed embed stage: the same store whatever the sharding or worker count; incremental; idempotent."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from test_cooccurrence import resplit

from pmi_pipeline.cooccurrence import count_shard_with_ids, count_shards
from pmi_pipeline.embed import EmbedParams, embed, new_shards, publish_counts
from pmi_pipeline.errors import PipelineError, StoreError
from pmi_pipeline.shards import discover_shards, write_annotation_shard
from pmi_pipeline.store import EmbeddingStore

PARAMS = EmbedParams(dim=16)


def contents(store_path):
    store = EmbeddingStore(store_path)
    version = store.read()
    return version, store.read_counts()


def assert_same_store(a, b):
    (va, ca), (vb, cb) = contents(a), contents(b)
    assert va.labels == vb.labels
    np.testing.assert_array_equal(va.label_counts, vb.label_counts)
    np.testing.assert_allclose(va.eigenvalues, vb.eigenvalues, rtol=1e-10)
    np.testing.assert_allclose(va.embedding, vb.embedding, rtol=1e-4, atol=1e-5)
    assert ca.labels.tolist() == cb.labels.tolist() and ca.equals(cb)
    assert va.attrs["params"] == vb.attrs["params"] and va.attrs["n_examples"] == vb.attrs["n_examples"]


def test_same_store_whatever_the_sharding_and_workers(eurlex_dir, tmp_path, dask_clients):
    original = discover_shards([eurlex_dir])
    seven = resplit(original, tmp_path / "seven", 7)
    embed(original, tmp_path / "base", PARAMS)
    embed(seven, tmp_path / "seven-shards", PARAMS)
    embed(original, tmp_path / "one-worker", PARAMS, dask_clients[1])
    embed(seven, tmp_path / "two-workers", PARAMS, dask_clients[2])
    for other in ("seven-shards", "one-worker", "two-workers"):
        assert_same_store(tmp_path / "base", tmp_path / other)
    # content hashes differ with the sharding, so the manifests do too, but the shards are all accounted for
    assert len(EmbeddingStore(tmp_path / "two-workers").read_counts().manifest) == 7


def test_running_again_adds_nothing(bibtex_dir, tmp_path):
    first = embed([bibtex_dir], tmp_path / "s", PARAMS)
    again = embed([bibtex_dir], tmp_path / "s", PARAMS)
    assert first.version == "v0001" and again.version is None and "nothing new" in again.message
    store = EmbeddingStore(tmp_path / "s")
    assert store.versions() == ["v0001"]
    # the same content under another name is recognised too
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(discover_shards([bibtex_dir])[0].read_bytes())
    assert embed([copy], tmp_path / "s", PARAMS).version is None
    assert new_shards(tmp_path / "s", [copy]) == []


def test_new_parameters_reuse_the_stored_counts(bibtex_dir, tmp_path):
    embed([bibtex_dir], tmp_path / "s", PARAMS)
    result = embed([bibtex_dir], tmp_path / "s", EmbedParams(dim=8, pmi="ppmi"))
    assert result.version == "v0002" and result.new_shards == [] and result.n_new_annotations == 0
    store = EmbeddingStore(tmp_path / "s")
    assert store.read_counts("v0002").equals(store.read_counts("v0001"))
    assert store.read().attrs["params"]["pmi"] == "ppmi"


def test_incremental_equals_full_and_aligns(eurlex_dir, tmp_path):
    shards = discover_shards([eurlex_dir])
    # both runs reach the same subspace (pinned: this tests alignment, not the defaults)
    converged = EmbedParams(dim=16, n_oversamples=64, n_power_iter=12, power=0.5, spectral_shift=0.0)
    embed(shards[:3], tmp_path / "inc", converged)
    second = embed(shards, tmp_path / "inc", converged)
    embed(shards, tmp_path / "full", converged)
    inc, full = EmbeddingStore(tmp_path / "inc"), EmbeddingStore(tmp_path / "full")
    assert second.new_shards == [str(shards[3])] and len(second.skipped_shards) == 3
    assert inc.read_counts().equals(full.read_counts())
    # the new version is rotated onto the previous one: shared labels keep their direction
    alignment = second.alignment
    assert alignment["parent"] == "v0001" and alignment["n_new_labels"] > 0
    assert alignment["mean_cosine"] > 0.8 > alignment["mean_cosine_unaligned"]
    # and the rotation leaves the geometry of the full, unaligned factorization intact
    a, b = inc.read(), full.read()
    index_a = a.index()
    ea = a.embedding[[index_a[label] for label in b.labels]].astype(np.float64)
    eb = b.embedding.astype(np.float64)
    np.testing.assert_allclose(ea @ ea.T, eb @ eb.T, atol=1e-3 * np.abs(eb @ eb.T).max())


def test_alignment_is_a_rotation(bibtex_dir, tmp_path):
    from pmi_pipeline.embed import align_to_parent

    embed([bibtex_dir], tmp_path / "s", PARAMS)
    parent = EmbeddingStore(tmp_path / "s").read()
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((parent.dim, parent.dim)))
    scrambled = (parent.embedding.astype(np.float64) @ rotation).astype(np.float32)
    aligned, summary = align_to_parent(scrambled, np.array(parent.labels, dtype=object), parent)
    np.testing.assert_allclose(aligned, parent.embedding, atol=1e-5)  # the rotation is undone exactly
    assert summary["mean_cosine"] > 0.9999 and summary["n_new_labels"] == 0
    np.testing.assert_allclose(aligned @ aligned.T, scrambled @ scrambled.T, atol=1e-4)


def test_rejected_shards_are_reported_and_not_counted(bibtex_dir, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"\x00" * 10)
    result = embed([bibtex_dir, bad], tmp_path / "s", PARAMS)
    assert result.version == "v0001" and len(result.rejected) == 1 and str(bad) in result.rejected[0]
    assert EmbeddingStore(tmp_path / "s").read_counts().equals(count_shards(discover_shards([bibtex_dir])).counts)
    with pytest.raises(PipelineError, match="nothing to embed"):
        embed([bad], tmp_path / "only-bad", PARAMS)
    assert not EmbeddingStore(tmp_path / "only-bad").exists()


def test_publish_counts_refuses_counted_shards(bibtex_dir, tmp_path):
    parts = [count_shard_with_ids(p) for p in discover_shards([bibtex_dir])]
    assert publish_counts(tmp_path / "s", parts, PARAMS).version == "v0001"
    with pytest.raises(StoreError, match="already counted"):
        publish_counts(tmp_path / "s", parts, PARAMS)


def test_fewer_positive_eigenvalues_are_reported(bibtex_dir, tmp_path):
    result = embed([bibtex_dir], tmp_path / "s", EmbedParams(dim=100))
    assert result.n_positive_eigenvalues < 100 and result.dim == result.n_positive_eigenvalues
    version = EmbeddingStore(tmp_path / "s").read()
    assert version.embedding.shape == (159, result.dim) and np.all(version.eigenvalues > 0)
    assert version.attrs["dim_requested"] == 100


def damage_array(path):
    """Change one value in place: the array still decodes, only its checksum tells."""
    array = zarr.open_array(path, mode="r+")
    values = array[...]
    values[0] += 1
    array[...] = values


def test_a_shard_changed_after_it_was_counted_is_rejected(tmp_path):
    shard = write_annotation_shard(tmp_path / "in" / "a.parquet", [1, 2], [["p", "q"], ["q", "r"]])
    embed([shard], tmp_path / "s", PARAMS)
    before = EmbeddingStore(tmp_path / "s").read_counts()
    write_annotation_shard(shard, [1, 2, 3], [["p", "q"], ["q", "r"], ["p", "r"]])  # rewritten in place
    result = embed([shard], tmp_path / "s", PARAMS)
    assert result.version is None and len(result.rejected) == 1
    assert str(shard) in result.rejected[0] and "changed after it was counted" in result.rejected[0]
    store = EmbeddingStore(tmp_path / "s")
    assert store.versions() == ["v0001"] and store.read_counts().equals(before)
    # Under a new name it is a new shard, but its examples 1 and 2 are counted already: refused for that.
    moved = shard.rename(tmp_path / "in" / "a-2.parquet")
    result = embed([moved], tmp_path / "s", PARAMS)
    assert len(result.rejected) == 1 and "already counted from shard" in result.rejected[0]
    assert store.versions() == ["v0001"]


def test_a_shard_changed_between_listing_and_counting_is_not_counted(bibtex_dir):
    paths = discover_shards([bibtex_dir])
    result = count_shards(paths, expected_hashes=["sha256:" + "0" * 64] * len(paths))
    assert len(result.rejected) == len(paths) and result.counts.n_examples == 0
    assert "changed after it was listed" in str(result.rejected[0])


@pytest.mark.parametrize("array", ["pair_count", "label_counts", "pair_row"])
def test_damaged_counts_stop_the_next_writer(bibtex_dir, tmp_path, array):
    embed([bibtex_dir], tmp_path / "s", PARAMS)
    damage_array(tmp_path / "s" / "versions" / "v0001" / "counts" / array)
    extra = write_annotation_shard(tmp_path / "new.parquet", ["n1"], [["p", "q"]])
    with pytest.raises(StoreError, match=f"counts/{array}"):
        embed([bibtex_dir, extra], tmp_path / "s", PARAMS)
    assert EmbeddingStore(tmp_path / "s").versions() == ["v0001"]


def test_a_foreign_or_unreadable_store_is_refused_and_left_alone(bibtex_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(StoreError, match="not a pmi-pipeline embedding store"):
        embed([bibtex_dir], foreign, PARAMS)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an embedding store"):
        embed([bibtex_dir], other, PARAMS)
    assert sorted(p.name for p in other.iterdir() if p.name != ".lock") == ["notes.txt"]
    broken = tmp_path / "broken"
    embed([bibtex_dir], broken, PARAMS)
    (broken / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="unreadable store metadata"):
        embed([bibtex_dir], broken, PARAMS)
