"""``check`` finds real damage in a real store: flipped bytes, deleted chunks, broken metadata."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from pmi_pipeline.check import check_store
from pmi_pipeline.cli import main
from pmi_pipeline.embed import EmbedParams, embed


@pytest.fixture(scope="module")
def pristine(bibtex_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "store"
    embed([bibtex_dir], path, EmbedParams(dim=8))
    embed([bibtex_dir], path, EmbedParams(dim=4))
    return path


@pytest.fixture
def store(pristine, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(pristine, copy)
    return copy


def errors(path):
    return [p for p in check_store(path) if p.severity == "error"]


def test_a_fresh_store_is_sound(store, capsys):
    assert errors(store) == []
    assert main(["check", "--store", str(store)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_changed_values_are_caught_by_checksum(store):
    array = zarr.open_array(store / "versions" / "v0001" / "embedding", mode="r+")
    values = array[...]
    values[3, 2] += 1e-3
    array[...] = values
    found = errors(store)
    assert [p.where for p in found] == ["v0001/embedding"] and "checksum" in found[0].message


def test_deleted_chunk_and_counts_are_caught(store):
    for chunk in (store / "versions" / "v0002" / "counts" / "pair_count" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    found = errors(store)
    assert any(p.where == "v0002/counts/pair_count" for p in found)


def test_inconsistent_counts_are_caught(store):
    group = zarr.open_group(store / "versions" / "v0001" / "counts", mode="r+")
    rows, cols = group["pair_row"][...], group["pair_col"][...]
    group["pair_row"][...], group["pair_col"][...] = cols, rows  # lower triangle now
    messages = " ".join(p.message for p in errors(store))
    assert "row < col" in messages and "checksum" in messages


def test_latest_pointing_nowhere_and_foreign_metadata(store):
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["latest"] = "v0042"
    meta_path.write_text(json.dumps(meta))
    assert any("v0042" in p.message for p in errors(store))
    meta_path.write_text("{]")
    assert [p.where for p in errors(store)] == ["store"]


def test_unfinished_write_is_a_warning(store, capsys):
    (store / "versions" / ".tmp-v0003-abc").mkdir()
    problems = check_store(store)
    assert [p.severity for p in problems] == ["warning"]
    assert main(["check", "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_version_selection(store):
    assert check_store(store, ["v0002"]) == []
    assert [p.message for p in check_store(store, ["v0009"])] == ["no such version"]
    assert np.all([p.severity == "error" for p in check_store(store.parent / "absent")])


@pytest.mark.parametrize("array", ["example_ids/hash", "example_ids/shard"])
def test_a_damaged_example_id_index_is_caught(store, array):
    target = zarr.open_array(store / "versions" / "v0001" / array, mode="r+")
    values = target[...]
    values[0] += 1  # still decodes: only the checksum (and, for shard, the listed shards) can tell
    target[...] = values
    found = errors(store)
    assert f"v0001/{array}" in [p.where for p in found]
