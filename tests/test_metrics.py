"""Metrics vs direct per-example loops over anchors.md's definitions, and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from pmi_pipeline.metrics import (
    class_weighted_map_at_k,
    compute_metrics,
    frequency_class_weights,
    hits,
    inverse_propensity,
    map_at_k,
    ndcg_at_k,
    precision_at_k,
    psp_at_k,
    remove_invalid_rows,
)

# ----------------------------------------------------------------------------------------------------
# Direct references: one example at a time, straight from the definitions.


def _truth_sets(truth: sp.csr_matrix) -> list[set[int]]:
    return [set(truth.indices[truth.indptr[i] : truth.indptr[i + 1]].tolist()) for i in range(truth.shape[0])]


def ref_precision(topk, truth, k):
    return np.mean([sum(int(j) in y for j in row[:k]) / k for row, y in zip(topk, _truth_sets(truth), strict=True)])


def ref_ndcg(topk, truth, k):
    vals = []
    for row, y in zip(topk, _truth_sets(truth), strict=True):
        dcg = sum(1 / math.log2(r + 2) for r, j in enumerate(row[:k]) if int(j) in y)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(y))))
        vals.append(dcg / idcg if idcg else 0.0)
    return np.mean(vals)


def ref_psp(topk, truth, q, k):
    num = den = 0.0
    for row, y in zip(topk, _truth_sets(truth), strict=True):
        num += sum(q[j] for j in row[:k] if int(j) in y) / k
        den += sum(sorted((q[j] for j in y), reverse=True)[:k]) / k
    return num / den


def ref_ap(row, y, k, w=None):
    hits_so_far, total = 0, 0.0
    for r, j in enumerate(row[:k]):
        if int(j) in y:
            hits_so_far += 1
            total += (1.0 if w is None else w[j]) * hits_so_far / (r + 1)
    return total / min(k, len(y)) if y else 0.0


def ref_map(topk, truth, k, w=None):
    return np.mean([ref_ap(row, y, k, w) for row, y in zip(topk, _truth_sets(truth), strict=True)])


def ref_inv_prop(counts, n, a, b):
    c = (math.log(n) - 1) * (b + 1) ** a
    return np.array([1 + c * (nl + b) ** (-a) for nl in counts])


# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def hand_case():
    # 4 examples, 6 labels; example 3 has no label; label 5 is true but never predicted.
    truth = sp.csr_matrix(
        np.array(
            [
                [1, 0, 1, 0, 0, 0],
                [0, 1, 0, 0, 0, 1],
                [1, 1, 1, 1, 0, 0],
                [0, 0, 0, 0, 0, 0],
            ],
            dtype=np.float32,
        )
    )
    topk = np.array(
        [
            [0, 1, 2, 3, 4],
            [3, 1, 0, 2, 4],
            [4, 3, 2, 1, 0],
            [0, 1, 2, 3, 4],
        ]
    )
    return topk, truth


def test_hand_computed_values(hand_case):
    topk, truth = hand_case
    # P@1: hits at rank 1 are [1, 0, 0, 0] -> 1/4; P@3: [2, 1, 2, 0] / 3 / 4
    assert precision_at_k(topk, truth, 1) == pytest.approx(0.25)
    assert precision_at_k(topk, truth, 3) == pytest.approx(5 / 12)
    # the label-less row is kept by default and dropped with remove_invalid
    assert precision_at_k(topk, truth, 1, remove_invalid=True) == pytest.approx(1 / 3)
    # nDCG@1 of row 0 is 1, the others 0
    assert ndcg_at_k(topk, truth, 1) == pytest.approx(0.25)
    # AP@5 of row 1: hit at rank 2 -> (1/2) / min(5, 2)
    assert ref_ap(topk[1], {1, 5}, 5) == pytest.approx(0.25)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_against_direct_reference_hand_case(hand_case, k):
    topk, truth = hand_case
    counts = np.array([10, 3, 0, 1, 7, 0])
    q = inverse_propensity(counts, 20)
    assert precision_at_k(topk, truth, k) == pytest.approx(ref_precision(topk, truth, k))
    assert ndcg_at_k(topk, truth, k) == pytest.approx(ref_ndcg(topk, truth, k))
    assert psp_at_k(topk, truth, q, k) == pytest.approx(ref_psp(topk, truth, q, k))
    assert map_at_k(topk, truth, k) == pytest.approx(ref_map(topk, truth, k))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_direct_reference_random(seed):
    rng = np.random.default_rng(seed)
    n, n_labels, kmax = 60, 25, 10
    truth = sp.random(n, n_labels, density=0.12, format="csr", random_state=seed)
    truth.data[:] = 1.0
    topk = np.stack([rng.permutation(n_labels)[:kmax] for _ in range(n)])
    counts = rng.integers(0, 50, n_labels)
    q = inverse_propensity(counts, 500, A=0.6, B=2.6)
    w = frequency_class_weights(counts)
    for k in (1, 3, 5, 10):
        assert precision_at_k(topk, truth, k) == pytest.approx(ref_precision(topk, truth, k))
        assert ndcg_at_k(topk, truth, k) == pytest.approx(ref_ndcg(topk, truth, k))
        assert psp_at_k(topk, truth, q, k) == pytest.approx(ref_psp(topk, truth, q, k))
        assert map_at_k(topk, truth, k) == pytest.approx(ref_map(topk, truth, k))
        assert class_weighted_map_at_k(topk, truth, w, k) == pytest.approx(ref_map(topk, truth, k, w))


def test_inverse_propensity_formula():
    counts = np.array([0, 1, 5, 100, 4000])
    for a, b in [(0.55, 1.5), (0.6, 2.6), (0.5, 0.4)]:
        np.testing.assert_allclose(inverse_propensity(counts, 4880, a, b), ref_inv_prop(counts, 4880, a, b))
    q = inverse_propensity(counts, 4880)
    assert np.all(np.diff(q) < 0), "rarer labels must weigh more"


def test_perfect_ranking_scores_one():
    truth = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    q = inverse_propensity(np.array([5, 1, 2, 9]), 10)
    # the oracle order by q within each row
    topk = np.array([[1, 0, 2, 3], [2, 0, 1, 3]])
    assert precision_at_k(topk, truth, 1) == pytest.approx(1.0)
    assert ndcg_at_k(topk, truth, 3) == pytest.approx(1.0)
    assert psp_at_k(topk, truth, q, 1) == pytest.approx(1.0)
    assert psp_at_k(topk, truth, q, 3) == pytest.approx(1.0)
    assert map_at_k(topk, truth, 4) == pytest.approx(1.0)


def test_padding_and_unpredictable_labels():
    truth = sp.csr_matrix(np.array([[1, 0, 0, 1]], dtype=np.float32))  # label 3: outside the model's vocabulary
    topk = np.array([[0, 1, -1]])
    assert hits(topk, truth).tolist() == [[True, False, False]]
    assert precision_at_k(topk, truth, 3) == pytest.approx(1 / 3)
    # the unpredictable label still counts in IDCG and AP's denominator
    assert ndcg_at_k(topk, truth, 3) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert map_at_k(topk, truth, 3) == pytest.approx(0.5)


def test_remove_invalid_and_compute_metrics(hand_case):
    topk, truth = hand_case
    t2, y2 = remove_invalid_rows(topk, truth)
    assert t2.shape[0] == y2.shape[0] == 3
    counts = np.array([10, 3, 0, 1, 7, 0])
    q = inverse_propensity(counts, 20)
    kept = compute_metrics(topk, truth, inv_propensity=q, class_weights=np.ones(6), map_k=5)
    removed = compute_metrics(topk, truth, inv_propensity=q, class_weights=np.ones(6), map_k=5, remove_invalid=True)
    assert set(kept) >= {"P@1", "P@3", "P@5", "nDCG@1", "nDCG@5", "PSP@1", "PSP@5", "MAP@5", "cwMAP@5"}
    assert kept["P@1"] == pytest.approx(25.0)
    assert removed["P@1"] == pytest.approx(100 / 3)
    assert kept["PSP@3"] == pytest.approx(removed["PSP@3"])  # empty rows add nothing to either side
    assert kept["cwMAP@5"] == pytest.approx(kept["MAP@5"])  # unit weights


def test_input_validation(hand_case):
    topk, truth = hand_case
    with pytest.raises(ValueError):
        precision_at_k(topk, truth, 6)  # fewer predictions than k
    with pytest.raises(ValueError):
        precision_at_k(topk[:2], truth, 1)
    with pytest.raises(ValueError):
        precision_at_k(topk + 10, truth, 1)
    with pytest.raises(ValueError):
        psp_at_k(topk, truth, np.ones(3), 1)
