"""PMI variants against a dense numpy transcription of the formulas, on real bibtex counts."""

from __future__ import annotations

import numpy as np
import pytest

from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.pmi import PMIParams, pmi_matrix
from pmi_pipeline.shards import discover_shards


def dense_reference(label_counts, pairs_upper, n, p: PMIParams):
    """PMI written out densely, straight from the definitions (the seed blog's code, plus Levy et al.)."""
    kept = np.flatnonzero(label_counts >= p.min_count)
    c = label_counts[kept].astype(float)
    pairs = pairs_upper + pairs_upper.T
    n_ij = pairs[np.ix_(kept, kept)].astype(float)
    marg = c**p.smoothing / (c**p.smoothing).sum() * c.sum() / n
    observed = n_ij >= p.min_pair_count
    with np.errstate(divide="ignore"):
        pmi = np.log((n_ij / n) / np.outer(marg, marg)) - np.log(p.shift)
    pmi[~observed] = 0.0
    if p.variant == "ppmi":
        pmi = np.maximum(pmi, 0.0)
    np.fill_diagonal(pmi, 0.0)
    return pmi, kept


@pytest.fixture(scope="module")
def bibtex_counts(bibtex_dir):
    return count_shards(discover_shards([bibtex_dir])).counts


@pytest.mark.parametrize(
    "params",
    [
        PMIParams(),
        PMIParams(variant="ppmi"),
        PMIParams(shift=5.0),
        PMIParams(variant="ppmi", shift=2.0, smoothing=0.75),
        PMIParams(smoothing=0.5),
        PMIParams(min_count=50, min_pair_count=3),
    ],
    ids=["pmi", "ppmi", "shift5", "sppmi-smooth", "smooth0.5", "min-counts"],
)
def test_pmi_matches_dense_reference(bibtex_counts, params):
    matrix, kept = pmi_matrix(bibtex_counts, params)
    reference, ref_kept = dense_reference(
        bibtex_counts.label_counts, bibtex_counts.pairs.toarray(), bibtex_counts.n_examples, params
    )
    np.testing.assert_array_equal(kept, ref_kept)
    np.testing.assert_allclose(matrix.toarray(), reference, rtol=1e-12, atol=1e-12)
    assert (matrix != matrix.T).nnz == 0 and matrix.diagonal().max() == 0


def test_seed_blog_toy_example():
    """The blog's 7 x 5 example: PP = M.T M / n, diagonal dropped, log(PP / (TP_i TP_j)) on observed pairs."""
    import scipy.sparse as sp

    from pmi_pipeline.cooccurrence import Counts

    m = np.array(
        [
            [0, 1, 0, 1, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 1, 0],
            [1, 0, 0, 0, 1],
            [0, 1, 1, 1, 0],
            [1, 0, 0, 1, 1],
            [0, 0, 0, 0, 1],
        ]
    )
    n = m.shape[0]
    pp = m.T @ m / n
    tp = pp.diagonal().copy()
    np.fill_diagonal(pp, 0)
    i, j = np.nonzero(pp)
    expected = np.zeros_like(pp)
    expected[i, j] = np.log(pp[i, j] / (tp[i] * tp[j]))
    gram = m.T @ m
    counts = Counts(np.array(list("abcde"), dtype=object), np.diag(gram), sp.csr_matrix(np.triu(gram, 1)), n)
    matrix, _ = pmi_matrix(counts)
    np.testing.assert_allclose(matrix.toarray(), expected, rtol=1e-12)


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="variant"):
        PMIParams(variant="npmi")
    with pytest.raises(ValueError, match="shift"):
        PMIParams(shift=0)
    with pytest.raises(ValueError, match="smoothing"):
        PMIParams(smoothing=1.5)
