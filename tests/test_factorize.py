"""Randomized eigendecomposition against ARPACK (scipy eigsh/svds) on real PMI matrices, and awkward spectra."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh, svds

from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.factorize import FactorizeParams, factorize, randomized_eigh
from pmi_pipeline.pmi import PMIParams, pmi_matrix
from pmi_pipeline.shards import discover_shards

ACCURATE = {"n_oversamples": 96, "n_power_iter": 12}


@pytest.fixture(scope="module")
def pmi_of(data_dir):
    cache = {}

    def get(dataset: str, variant: str = "pmi") -> sp.csr_matrix:
        if (dataset, variant) not in cache:
            counts = count_shards(discover_shards([data_dir / dataset])).counts
            cache[dataset, variant] = pmi_matrix(counts, PMIParams(variant=variant))[0]
        return cache[dataset, variant]

    return get


@pytest.mark.parametrize(
    ("dataset", "variant"),
    [("bibtex", "pmi"), ("delicious", "pmi"), ("delicious", "ppmi"), ("eurlex", "pmi")],
)
def test_top_algebraic_eigenvalues_match_eigsh(pmi_of, dataset, variant):
    a = pmi_of(dataset, variant)
    k = 32
    reference, ref_vectors = eigsh(a, k=k, which="LA")
    reference, ref_vectors = reference[::-1], ref_vectors[:, ::-1]
    values, vectors, _ = randomized_eigh(a, k, **ACCURATE)
    np.testing.assert_allclose(values, reference, rtol=1e-3)
    assert np.all(np.diff(values) <= 0)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(k), atol=1e-8)
    # eigenvectors agree up to sign wherever the eigenvalue is well separated
    gaps = np.minimum(np.abs(np.diff(reference, prepend=np.inf)), np.abs(np.diff(reference, append=-np.inf)))
    separated = gaps > 1e-2 * np.abs(reference)
    overlap = np.abs(np.sum(vectors * ref_vectors, axis=0))
    assert np.all(overlap[separated] > 0.99)


def test_svd_matches_svds_singular_values(pmi_of):
    a = pmi_of("eurlex")
    k = 32
    reference = svds(a, k=k, return_singular_vectors=False)[::-1]
    fact = factorize(a, FactorizeParams(method="svd", dim=k, **ACCURATE))
    np.testing.assert_allclose(fact.eigenvalues, reference, rtol=1e-3)
    assert fact.embedding.shape == (a.shape[0], k)


def test_pmi_is_indefinite_and_svd_mixes_in_negative_directions(pmi_of):
    """The design's point, on real data: singular values include |negative eigenvalues|."""
    a = pmi_of("delicious")
    most_negative = np.linalg.eigvalsh(a.toarray())[0]  # dense: 983 labels, and ARPACK is slow at the low end
    assert most_negative < -50  # far from positive semidefinite
    eig = factorize(a, FactorizeParams(method="eig", dim=32, **ACCURATE))
    svd = factorize(a, FactorizeParams(method="svd", dim=32, **ACCURATE))
    assert np.all(eig.eigenvalues > 0)
    assert np.any(np.isclose(svd.eigenvalues, abs(most_negative), rtol=1e-3))  # a negative direction, in svd


def synthetic(spectrum: np.ndarray, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((spectrum.size, spectrum.size)))
    return (q * spectrum) @ q.T


def test_large_negative_eigenvalues_do_not_displace_top_positive_ones():
    # 10 positive eigenvalues, 40 negative ones larger in magnitude, and a bulk near zero
    rng = np.random.default_rng(1)
    spectrum = np.concatenate([np.linspace(20, 11, 10), -np.linspace(60, 30, 40), rng.normal(0, 0.5, 250)])
    a = sp.csr_matrix(synthetic(spectrum))
    expected = np.sort(spectrum)[::-1][:10]
    for shift in (0.0, "auto"):
        values, _, used = randomized_eigh(a, 10, n_oversamples=60, n_power_iter=20, spectral_shift=shift)
        np.testing.assert_allclose(values, expected, rtol=1e-4)
        assert (used > 25) == (shift == "auto")
    magnitude, _, _ = randomized_eigh(a, 10, n_oversamples=60, n_power_iter=20, which="LM")
    np.testing.assert_allclose(magnitude, -np.linspace(60, 30, 40)[:10], rtol=1e-4)


def test_fewer_positive_eigenvalues_than_asked_are_reported_not_padded():
    spectrum = np.concatenate([[9.0, 7.0, 5.0], -np.arange(1.0, 58.0)])
    fact = factorize(sp.csr_matrix(synthetic(spectrum)), FactorizeParams(dim=8, n_oversamples=52))
    assert fact.n_positive == 3 and fact.embedding.shape == (60, 3)
    np.testing.assert_allclose(fact.eigenvalues, [9, 7, 5], rtol=1e-8)
    assert fact.ritz_values.size == 8


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_embedding_reproduces_the_positive_part(power):
    spectrum = np.array([8.0, 4.0, 2.0, -3.0, -1.0, 0.5])
    a = synthetic(spectrum)
    fact = factorize(sp.csr_matrix(a), FactorizeParams(dim=4, power=power))  # sketch >= m: exact
    e = fact.embedding.astype(np.float64)
    values, vectors = np.linalg.eigh(a)
    positive = values > 0
    expected = (vectors[:, positive] * values[positive] ** (2 * power)) @ vectors[:, positive].T
    np.testing.assert_allclose(e @ e.T, expected, atol=1e-5)


def test_seeded_and_deterministic(pmi_of):
    a = pmi_of("bibtex")
    first = factorize(a, FactorizeParams(dim=16))
    again = factorize(a, FactorizeParams(dim=16))
    np.testing.assert_array_equal(first.embedding, again.embedding)


def test_warm_start_converges_faster(pmi_of):
    a = pmi_of("eurlex")
    k = 32
    reference = eigsh(a, k=k, which="LA", return_eigenvectors=False)[::-1]
    _, previous, _ = randomized_eigh(a, k, **ACCURATE)
    cold, _, _ = randomized_eigh(a, k, n_oversamples=32, n_power_iter=1, seed=5)
    warm, _, _ = randomized_eigh(a, k, n_oversamples=32, n_power_iter=1, seed=5, init=previous)
    cold_error = np.max(np.abs(cold - reference) / reference)
    warm_error = np.max(np.abs(warm - reference) / reference)
    assert warm_error < 1e-5 and cold_error > 100 * warm_error


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="factorization"):
        FactorizeParams(method="nmf")
    with pytest.raises(ValueError, match="dim"):
        FactorizeParams(dim=0)


@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6, 1e10, np.inf])
def test_orthonormal_basis_spans_the_columns_at_any_conditioning(cond):
    """CholeskyQR2 where Y is well enough conditioned, Householder (tsqr) beyond: Q orthonormal, same span."""
    import dask.array as da

    from pmi_pipeline.factorize import _orthonormal

    rng = np.random.default_rng(0)
    m, width = 3000, 40
    u, _ = np.linalg.qr(rng.standard_normal((m, width)))
    v, _ = np.linalg.qr(rng.standard_normal((width, width)))
    singular = np.logspace(0, -np.log10(cond), width) if np.isfinite(cond) else np.r_[np.ones(30), np.zeros(10)]
    y = (u * singular) @ v.T
    q = _orthonormal(da.from_array(y, chunks=(700, width))).compute()
    np.testing.assert_allclose(q.T @ q, np.eye(width), atol=1e-10)
    rank = int((singular > 1e-12).sum())
    basis = u[:, :rank]  # Y's column space
    # Rounding Y itself moves a direction of singular value s by about eps / s: that is the most any method can
    # recover (2-4 eps / s here; a fixed 1e-6 on the whole span failed at 1.01e-6 on one machine for cond = 1e10).
    missed = np.linalg.norm(q @ (q.T @ basis) - basis, axis=0)
    assert np.all(missed <= 100 * np.finfo(float).eps / singular[:rank])
