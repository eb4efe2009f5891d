"""The Zarr store: round trip, versions, atomic publish, leftovers, locking, foreign stores."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zarr

from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.errors import StoreError
from pmi_pipeline.shards import discover_shards
from pmi_pipeline.store import EmbeddingStore


@pytest.fixture(scope="module")
def counts(bibtex_dir):
    return count_shards(discover_shards([bibtex_dir])).counts


def publish(store: EmbeddingStore, counts, k: int = 4, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with store.lock():
        return store.publish(
            embedding=rng.standard_normal((counts.n_labels, k)).astype(np.float32),
            labels=counts.labels,
            label_counts=counts.label_counts,
            eigenvalues=np.arange(k, 0, -1.0),
            counts=counts,
            attrs={"params": {"dim": k}},
        )


def test_round_trip_and_versions(tmp_path, counts):
    store = EmbeddingStore(tmp_path / "store")
    assert store.latest is None and store.versions() == []
    assert publish(store, counts) == "v0001"
    assert publish(store, counts, seed=1) == "v0002"
    assert store.versions() == ["v0001", "v0002"] and store.latest == "v0002"
    v1, v2 = store.read("v0001"), store.read()
    assert v2.name == "v0002" and v2.attrs["parent"] == "v0001" and v1.attrs["parent"] is None
    assert v1.labels == counts.labels.tolist() and v1.embedding.dtype == np.float32
    np.testing.assert_array_equal(v1.label_counts, counts.label_counts)
    assert not np.array_equal(v1.embedding, v2.embedding)
    back = store.read_counts()
    assert back.labels.tolist() == counts.labels.tolist() and back.equals(counts)
    assert back.manifest == counts.manifest
    # the layout promised in the design: a Zarr v3 group readable by plain zarr
    root = zarr.open_group(tmp_path / "store", mode="r")
    assert root.attrs["latest"] == "v0002" and root.attrs["format_version"] == 1
    assert root["versions/v0001/embedding"].shape == (counts.n_labels, 4)
    assert root["versions/v0001/labels"][0] == counts.labels[0]


def test_unfinished_writes_are_invisible_and_cleaned_up(tmp_path, counts):
    store = EmbeddingStore(tmp_path / "store")
    publish(store, counts)
    leftover = tmp_path / "store" / "versions" / ".tmp-v0002-deadbeef"
    leftover.mkdir()
    (leftover / "zarr.json").write_text("{}")
    assert store.versions() == ["v0001"] and store.latest == "v0001"
    assert publish(store, counts) == "v0002"
    assert not leftover.exists()


def test_missing_and_foreign_stores(tmp_path, counts):
    with pytest.raises(StoreError, match="no embedding store"):
        EmbeddingStore(tmp_path / "nothing").read()
    foreign = tmp_path / "foreign"
    zarr.open_group(foreign, mode="w").attrs["something"] = 1
    with pytest.raises(StoreError, match="not a pmi-pipeline embedding store"):
        EmbeddingStore(foreign).read()
    with pytest.raises(StoreError, match="not a pmi-pipeline embedding store"):
        publish(EmbeddingStore(foreign), counts)
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("do not overwrite")
    with pytest.raises(StoreError, match="refusing to write"):
        publish(EmbeddingStore(other), counts)
    assert (other / "precious.txt").read_text() == "do not overwrite"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="unreadable"):
        EmbeddingStore(corrupt).read()


def test_unknown_version_is_named(tmp_path, counts):
    store = EmbeddingStore(tmp_path / "store")
    publish(store, counts)
    with pytest.raises(StoreError, match=r"no version 'v0009'.*v0001"):
        store.read("v0009")


def test_second_writer_fails_or_waits(tmp_path, counts):
    store = EmbeddingStore(tmp_path / "store")
    released = threading.Event()

    def hold():
        with EmbeddingStore(tmp_path / "store").lock():
            held.set()
            released.wait(10)

    held = threading.Event()
    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    with pytest.raises(StoreError, match="locked by pid"):
        with store.lock(wait=False):
            pass
    start = time.monotonic()
    threading.Timer(0.5, released.set).start()
    with store.lock(wait=True):
        waited = time.monotonic() - start
    thread.join()
    assert waited > 0.3  # it really waited for the holder instead of interleaving


def test_latest_is_replaced_atomically(tmp_path, counts):
    store = EmbeddingStore(tmp_path / "store")
    publish(store, counts)
    publish(store, counts)
    meta = json.loads((tmp_path / "store" / "zarr.json").read_text())
    assert meta["attributes"]["latest"] == "v0002"
    assert not list((tmp_path / "store").glob(".*.tmp"))
