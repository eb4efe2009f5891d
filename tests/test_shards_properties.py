"""Property-based tests of the shard reader: for any valid shard the counts equal a plain-Python reference, and
any damage yields a ShardError (never another exception, never a partial result)."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pmi_pipeline.cooccurrence import count_batch, counts_from_batch
from pmi_pipeline.errors import ShardError
from pmi_pipeline.shards import read_annotations

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
label_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: len(s.encode("utf-8")) <= 1024
)
examples = st.lists(
    st.tuples(st.integers(-(2**40), 2**40), st.lists(label_text, min_size=1, max_size=6)), min_size=1, max_size=40
)


def reference(rows):
    """Label and pair counts from a dict of sets, the obvious way."""
    per_example: dict[int, set[str]] = {}
    for example_id, labels in rows:
        per_example.setdefault(example_id, set()).update(labels)
    label_counts: dict[str, int] = {}
    pair_counts: dict[tuple[str, str], int] = {}
    for labels in per_example.values():
        for label in labels:
            label_counts[label] = label_counts.get(label, 0) + 1
        for a, b in itertools.combinations(sorted(labels), 2):
            pair_counts[a, b] = pair_counts.get((a, b), 0) + 1
    return len(per_example), label_counts, pair_counts


#: How a writer may lay out the labels: row groups (each with its own dictionary), dictionary pages that fall
#: back to plain encoding, no dictionary at all.
layouts = st.fixed_dictionaries(
    {
        "row_group_size": st.integers(1, 50),
        "use_dictionary": st.booleans(),
        "dictionary_pagesize_limit": st.sampled_from([1, 16, 1 << 20]),
    }
)


def write_shard(path, rows, long_form, layout, arrow_dictionary, confidence=None):
    """Write ``rows`` as a long or list shard; ``confidence`` (one per label value, or per row in list form)."""
    if long_form:
        pairs = [(example_id, label) for example_id, labels in rows for label in labels]
        ids, labels = [p[0] for p in pairs], pa.array([p[1] for p in pairs], pa.string())
        if arrow_dictionary:  # a dictionary that repeats every value, as some writers leave it
            labels = pa.DictionaryArray.from_arrays(
                pa.array(range(0, 2 * len(labels), 2)), labels.take(pa.array([i // 2 for i in range(2 * len(labels))]))
            )
        columns = {"example_id": ids, "label": labels}
    else:
        columns = {"example_id": [r[0] for r in rows], "labels": [r[1] for r in rows]}
    if confidence is not None:
        columns["confidence"] = confidence
    pq.write_table(pa.table(columns), path, **layout)


def counted(paths, how):
    """Counts of shards: each read in its own sorted vocabulary (``read_annotations``), or as one batch
    (``count_batch``: the labels of the batch sorted once)."""
    if how == "annotations":
        return counts_from_batch([read_annotations(path) for path in paths])
    counts, outcomes = count_batch(paths)
    assert not [o for o in outcomes if isinstance(o, ShardError)]
    return counts


def assert_counts(counts, rows):
    n, label_counts, pair_counts = reference(rows)
    assert counts.n_examples == n
    assert dict(zip(counts.labels.tolist(), counts.label_counts.tolist(), strict=True)) == label_counts
    coo = counts.pairs.tocoo()
    got = {(counts.labels[i], counts.labels[j]): int(v) for i, j, v in zip(coo.row, coo.col, coo.data, strict=True)}
    assert got == pair_counts


@SETTINGS
@given(rows=examples, long_form=st.booleans(), layout=layouts, arrow_dictionary=st.booleans())
@pytest.mark.parametrize("how", ["annotations", "batch"])
def test_counts_equal_reference_for_any_valid_shard(tmp_path, rows, long_form, layout, arrow_dictionary, how):
    path = tmp_path / "shard.parquet"
    write_shard(path, rows, long_form, layout, arrow_dictionary)
    assert_counts(counted([path], how), rows)


@SETTINGS
@given(
    rows=examples,
    long_form=st.booleans(),
    layout=layouts,
    keep=st.lists(st.sampled_from([0.0, 0.25, 1.0]), min_size=240, max_size=240),
)
@pytest.mark.parametrize("how", ["annotations", "batch"])
def test_two_shards_with_negatives_count_as_their_kept_rows(tmp_path, rows, long_form, layout, keep, how):
    """Two shards (even and odd example ids) with explicit negatives (confidence 0, not counted), in one batch:
    labels only negatives use, and examples with only negatives, must vanish."""
    paths, kept = [], []
    for parity in (0, 1):
        part = [r for r in rows if r[0] % 2 == parity]
        if not part:
            continue
        n_values = sum(len(labels) for _, labels in part) if long_form else len(part)
        confidence = keep[:n_values]
        values = iter(confidence)
        kept_part = (
            [(i, [label for label in labels if next(values) > 0]) for i, labels in part]
            if long_form
            else [(i, labels) for (i, labels), c in zip(part, confidence, strict=True) if c > 0]
        )
        kept += [(i, labels) for i, labels in kept_part if labels]
        if not kept_part or not any(labels for _, labels in kept_part):
            continue  # a shard of negatives only: nothing to count, nothing to check
        path = tmp_path / f"shard-{parity}.parquet"
        write_shard(path, part, long_form, layout, False, confidence)
        paths.append(path)
    if paths:
        assert_counts(counted(paths, how), kept)


@SETTINGS
@given(
    rows=examples,
    damage=st.sampled_from(["truncate", "flip", "zero"]),
    where=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=8),
)
def test_damaged_files_fail_cleanly(tmp_path, rows, damage, where):
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"example_id": [r[0] for r in rows], "labels": [r[1] for r in rows]}), path)
    raw = bytearray(path.read_bytes())
    positions = [int(w * len(raw)) for w in where]  # relative positions, drawn before any I/O
    if damage == "truncate":
        raw = raw[: positions[0]]
    elif damage == "flip":
        for position in positions:
            raw[position] ^= 0xFF
    else:
        raw[positions[0] : positions[0] + 64] = bytes(len(raw[positions[0] : positions[0] + 64]))
    path.write_bytes(bytes(raw))
    try:
        ann = read_annotations(path)
    except ShardError as error:
        assert error.path == str(path)
        return
    # Damage that Parquet cannot detect (e.g. in uncompressed padding) may still read: then it must be consistent.
    assert ann.example_codes.size == ann.label_codes.size
    assert ann.label_codes.size == 0 or ann.label_codes.max() < len(ann.labels)


@pytest.mark.parametrize("value", [float("nan"), -1e-9, 1.0000001, float("inf")])
def test_any_bad_confidence_is_rejected(tmp_path, value):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"example_id": [1, 2], "label": ["a", "b"], "confidence": [0.5, value]}), path)
    with pytest.raises(ShardError) as info:
        read_annotations(path)
    assert (info.value.row, info.value.column) == (1, "confidence")
