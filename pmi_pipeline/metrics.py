"""Extreme multi-label ranking metrics, in plain numpy, computed from a top-k index matrix.

Every function takes ``topk`` (an ``(n, K)`` integer array: row ``i`` lists the predicted label indices of
example ``i``, best first; ``-1`` pads rows with fewer than ``K`` predictions) and ``truth`` (an ``(n, L)``
scipy CSR matrix, any non-zero entry a true label). The definitions follow the Extreme Classification
Repository and pyxclib (``xclib.evaluation.xc_metrics``), so the numbers are comparable to the published
tables:

- ``P@k``: (1/k) x number of true labels among the top k, averaged over examples.
- ``nDCG@k``: DCG@k / IDCG@k with DCG@k = sum over ranks r <= k of y_r / log2(r + 1) and IDCG over
  min(k, |y|) positions, averaged over examples.
- ``PSP@k``: propensity-scored precision. The sum over examples of sum over the top k of y_l q_l, divided
  by the same sum for the oracle that ranks each example's true labels by q_l (a ratio of sums, as pyxclib
  computes it, not a mean of per-example ratios). ``q_l`` comes from :func:`inverse_propensity` (Jain et al.,
  2016).
- ``MAP@k``: mean over examples of average precision at k,
  AP@k = sum over ranks r <= k of y_r P@r / min(k, |y|).
- class-weighted ``MAP@k``: AP@k where the hit at rank r counts ``w_l`` (the weight of its label) instead of
  1; see :func:`class_weighted_map_at_k` and :func:`frequency_class_weights`. The seed paper (Chollet 2016)
  reports a class-weighted MAP@100 without defining it; this is our definition, and it is not comparable to
  the paper's number.

Rows without labels. They are **kept** by default, as pyxclib keeps them: such a row contributes 0 to P@k,
nDCG@k and MAP@k (so the average is lower than over labelled rows only) and nothing to either side of PSP@k.
Pass ``remove_invalid=True`` to drop them first (pyxclib's ``remove_invalid``); the result then averages over
labelled rows only.

Label space. The truth may have more columns than the model can predict (labels outside the embedding store's
vocabulary, e.g. a label seen only in the test split): such labels still count as true labels and lower
recall-like terms (IDCG, AP's denominator, the PSP oracle). Predicted indices must lie in ``[0, L)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "average_precision_at_k",
    "class_weighted_map_at_k",
    "compute_metrics",
    "frequency_class_weights",
    "hits",
    "inverse_propensity",
    "map_at_k",
    "ndcg_at_k",
    "precision_at_k",
    "psp_at_k",
    "remove_invalid_rows",
]


def inverse_propensity(label_counts: np.ndarray, n: int, A: float = 0.55, B: float = 1.5) -> np.ndarray:
    """Inverse propensities ``q_l = 1 + C (N_l + B)^-A`` with ``C = (ln n - 1)(B + 1)^A`` (Jain et al., 2016).

    ``label_counts`` are the training frequencies ``N_l`` and ``n`` the number of training examples. The
    defaults A = 0.55, B = 1.5 are the repository's for most datasets (0.6, 2.6 for Amazon; 0.5, 0.4 for
    Wikipedia). A label never seen in training gets the largest weight, ``1 + C B^-A``.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if np.any(counts < 0):
        raise ValueError("label_counts must be non-negative")
    c = (np.log(n) - 1.0) * (B + 1.0) ** A
    return 1.0 + c * np.power(counts + B, -A)


def frequency_class_weights(label_counts: np.ndarray, lower: float = 0.1, upper: float = 10.0) -> np.ndarray:
    """Class weights for the weighted MAP: training frequency / mean frequency, clipped to [lower, upper].

    This mirrors the seed paper's description (an importance weight per class from its occurrence frequency,
    capped to a minimum and a maximum): frequent classes weigh more, so the best achievable value can
    exceed 1.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    mean = counts.mean() if counts.size and counts.mean() > 0 else 1.0
    return np.clip(counts / mean, lower, upper)


def _check(topk: np.ndarray, truth: sp.spmatrix) -> tuple[np.ndarray, sp.csr_matrix]:
    topk = np.asarray(topk)
    if topk.ndim != 2 or not np.issubdtype(topk.dtype, np.integer):
        raise ValueError(f"topk must be a 2-d integer array, got shape {topk.shape} dtype {topk.dtype}")
    truth = sp.csr_matrix(truth)
    if truth.shape[0] != topk.shape[0]:
        raise ValueError(f"topk has {topk.shape[0]} rows but truth has {truth.shape[0]}")
    if topk.size and (topk.max() >= truth.shape[1] or topk.min() < -1):
        raise ValueError(f"topk indices must lie in [-1, {truth.shape[1]})")
    return topk, truth


def remove_invalid_rows(topk: np.ndarray, truth: sp.spmatrix) -> tuple[np.ndarray, sp.csr_matrix]:
    """Drop the rows of ``truth`` (and ``topk``) that have no true label (pyxclib's ``remove_invalid``)."""
    topk, truth = _check(topk, truth)
    keep = np.diff(truth.indptr) > 0
    keep &= np.asarray(abs(truth).sum(axis=1)).ravel() > 0
    return topk[keep], truth[keep]


def hits(topk: np.ndarray, truth: sp.spmatrix) -> np.ndarray:
    """Boolean ``(n, K)``: whether ``topk[i, r]`` is a true label of example ``i`` (padding -1 never is)."""
    topk, truth = _check(topk, truth)
    truth = truth.copy()
    truth.eliminate_zeros()
    truth.sum_duplicates()  # also sorts the indices of each row
    n_cols = np.int64(truth.shape[1])
    rows = np.repeat(np.arange(truth.shape[0], dtype=np.int64), np.diff(truth.indptr))
    keys = rows * n_cols + truth.indices.astype(np.int64)  # sorted, since rows and per-row indices are
    query = np.arange(topk.shape[0], dtype=np.int64)[:, None] * n_cols + topk.astype(np.int64)
    pos = np.searchsorted(keys, query)
    found = np.zeros(query.shape, dtype=bool)
    inside = pos < keys.size
    found[inside] = keys[pos[inside]] == query[inside]
    return found & (topk >= 0)


def _prepare(topk, truth, k, remove_invalid):
    topk, truth = _check(topk, truth)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if topk.shape[1] < k:
        raise ValueError(f"need at least {k} predictions per row, topk has {topk.shape[1]}")
    if remove_invalid:
        topk, truth = remove_invalid_rows(topk, truth)
    return topk[:, :k], truth


def _n_true(truth: sp.csr_matrix) -> np.ndarray:
    t = truth.copy()
    t.eliminate_zeros()
    t.sum_duplicates()
    return np.diff(t.indptr)


def precision_at_k(topk: np.ndarray, truth: sp.spmatrix, k: int, *, remove_invalid: bool = False) -> float:
    """Mean P@k over examples, in [0, 1]."""
    topk, truth = _prepare(topk, truth, k, remove_invalid)
    if topk.shape[0] == 0:
        return float("nan")
    return float(hits(topk, truth).sum(axis=1).mean() / k)


def ndcg_at_k(topk: np.ndarray, truth: sp.spmatrix, k: int, *, remove_invalid: bool = False) -> float:
    """Mean nDCG@k over examples, in [0, 1]; a row with no true label scores 0."""
    topk, truth = _prepare(topk, truth, k, remove_invalid)
    if topk.shape[0] == 0:
        return float("nan")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits(topk, truth) * discount).sum(axis=1)
    ideal_len = np.minimum(_n_true(truth), k)
    idcg = np.concatenate([[0.0], np.cumsum(discount)])[ideal_len]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_row = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)
    return float(per_row.mean())


def psp_at_k(
    topk: np.ndarray,
    truth: sp.spmatrix,
    inv_propensity: np.ndarray,
    k: int,
    *,
    remove_invalid: bool = False,
) -> float:
    """Normalized propensity-scored precision PSP@k, in [0, 1].

    Numerator: sum over examples and over the top k of ``y_l q_l``. Denominator: the same for the best
    achievable ranking (each example's true labels sorted by ``q_l``). ``inv_propensity`` has one entry per
    column of ``truth``. Rows without labels add nothing to either side, so ``remove_invalid`` does not change
    the value.
    """
    topk, truth = _prepare(topk, truth, k, remove_invalid)
    q = np.asarray(inv_propensity, dtype=np.float64)
    if q.shape != (truth.shape[1],):
        raise ValueError(f"inv_propensity must have shape ({truth.shape[1]},), got {q.shape}")
    gained = (hits(topk, truth) * q[np.maximum(topk, 0)]).sum()
    best = _oracle_psp_sum(truth, q, k)
    return float(gained / best) if best > 0 else float("nan")


def _oracle_psp_sum(truth: sp.csr_matrix, q: np.ndarray, k: int) -> float:
    """Sum over rows of the k largest q_l among each row's true labels."""
    t = truth.copy()
    t.eliminate_zeros()
    t.sum_duplicates()
    lengths = np.diff(t.indptr)
    if t.nnz == 0:
        return 0.0
    rows = np.repeat(np.arange(t.shape[0]), lengths)
    vals = q[t.indices]
    # Sort by (row, -q): then the first k entries of each row are its best.
    order = np.lexsort((-vals, rows))
    vals = vals[order]
    rank_in_row = np.arange(t.nnz) - np.repeat(t.indptr[:-1], lengths)
    return float(vals[rank_in_row < k].sum())


def average_precision_at_k(
    topk: np.ndarray,
    truth: sp.spmatrix,
    k: int,
    *,
    class_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Per-example AP@k = sum over ranks r <= k of g_r P@r / min(k, |y|), with g_r = y_r (or y_r w_l if
    weighted).

    A row without labels gets 0.
    """
    topk, truth = _prepare(topk, truth, k, False)
    h = hits(topk, truth)
    prec = np.cumsum(h, axis=1) / np.arange(1, k + 1)
    gain = h.astype(np.float64)
    if class_weights is not None:
        w = np.asarray(class_weights, dtype=np.float64)
        if w.shape != (truth.shape[1],):
            raise ValueError(f"class_weights must have shape ({truth.shape[1]},), got {w.shape}")
        gain = gain * w[np.maximum(topk, 0)]
    denom = np.minimum(_n_true(truth), k)
    num = (gain * prec).sum(axis=1)
    return np.where(denom > 0, num / np.maximum(denom, 1), 0.0)


def map_at_k(topk: np.ndarray, truth: sp.spmatrix, k: int = 100, *, remove_invalid: bool = False) -> float:
    """MAP@k: mean over examples of :func:`average_precision_at_k`, in [0, 1]."""
    topk, truth = _prepare(topk, truth, k, remove_invalid)
    if topk.shape[0] == 0:
        return float("nan")
    return float(average_precision_at_k(topk, truth, k).mean())


def class_weighted_map_at_k(
    topk: np.ndarray,
    truth: sp.spmatrix,
    class_weights: np.ndarray,
    k: int = 100,
    *,
    remove_invalid: bool = False,
) -> float:
    """Class-weighted MAP@k: each hit's contribution to AP@k is multiplied by its label's weight.

    ``AP_w@k(i) = sum over r <= k of y_r w_{l_r} P@r / min(k, |y_i|)``, averaged over examples. With all
    weights 1 it equals :func:`map_at_k`; with :func:`frequency_class_weights` it favours frequent classes, as
    in the seed paper, and can exceed 1.
    """
    topk, truth = _prepare(topk, truth, k, remove_invalid)
    if topk.shape[0] == 0:
        return float("nan")
    return float(average_precision_at_k(topk, truth, k, class_weights=class_weights).mean())


def compute_metrics(
    topk: np.ndarray,
    truth: sp.spmatrix,
    *,
    inv_propensity: np.ndarray | None = None,
    class_weights: np.ndarray | None = None,
    ks: Sequence[int] = (1, 3, 5),
    map_k: int = 100,
    remove_invalid: bool = False,
) -> dict[str, float]:
    """All metrics as percentages, keyed ``P@1``, ``nDCG@3``, ``PSP@5``, ``MAP@100``, ``cwMAP@100``.

    PSP needs ``inv_propensity`` and the class-weighted MAP ``class_weights``; each is skipped when not given.
    MAP@``map_k`` is computed over ``min(map_k, K)`` predictions when ``topk`` has fewer columns ``K``.
    """
    topk, truth = _check(topk, truth)
    if remove_invalid:
        topk, truth = remove_invalid_rows(topk, truth)
    out: dict[str, float] = {}
    for k in ks:
        out[f"P@{k}"] = 100 * precision_at_k(topk, truth, k)
    for k in ks:
        out[f"nDCG@{k}"] = 100 * ndcg_at_k(topk, truth, k)
    if inv_propensity is not None:
        for k in ks:
            out[f"PSP@{k}"] = 100 * psp_at_k(topk, truth, inv_propensity, k)
    mk = min(map_k, topk.shape[1])
    out[f"MAP@{map_k}"] = 100 * map_at_k(topk, truth, mk)
    if class_weights is not None:
        out[f"cwMAP@{map_k}"] = 100 * class_weighted_map_at_k(topk, truth, class_weights, mk)
    return out
