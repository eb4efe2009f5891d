"""Randomized eigendecomposition of the sparse symmetric PMI matrix, on Dask.

The PMI matrix is *not* positive semidefinite (the seed paper says it is): it has large negative eigenvalues. An
SVD mixes their directions in, and then ``E E^T`` reproduces |PMI| rather than PMI. So the default keeps the top-k
*algebraic* eigenvalues, ``E = V |lambda|^p`` over the positive ones (p = 0.5 as in the seed), and reports how many
of the k asked for are positive instead of padding. ``method="svd"`` is the seed's ``U sqrt(Sigma)``; for a
symmetric matrix the singular pairs are ``(|lambda|, v)``, so it is the same machinery ranked by magnitude.

Method (Halko, Martinsson and Tropp 2011, algorithm 4.4 + 5.3): a Gaussian sketch of width ``l = k + oversamples``,
subspace (power) iterations with re-orthonormalisation by CholeskyQR2 (Dask's ``tsqr`` where that is too
ill-conditioned), then Rayleigh-Ritz on the small ``l x l`` matrix ``Q^T A Q``; products with A in float32. Raise
oversampling before iterations: accuracy of the Ritz values improves with the gap between the k-th and the (l+1)-th
eigenvalue by magnitude, and extra columns widen it more cheaply than extra passes over A. A range finder converges
to the largest-*magnitude* subspace, so strongly negative eigenvalues compete with the top positive ones;
``spectral_shift`` (``A + sI``, ``"auto"``: s from the most negative Ritz value of a first pass) moves them out of
the way, but it also narrows the relative gaps, and on delicious and EUR-Lex PMI it converged more slowly than more
oversampling (docs/factorization.md), so it is off by default. Everything is seeded and the Dask chunking depends
only on the matrix size, so results do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import dask
import dask.array as da
import numpy as np
import scipy.linalg
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from pmi_pipeline.faults import fault_point

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger(__name__)

Method = Literal["eig", "svd"]


@dataclass(frozen=True)
class FactorizeParams:
    method: Method = "eig"
    dim: int = 256
    power: float = 0.0
    n_oversamples: int | None = None  # None: max(dim, 16)
    n_power_iter: int = 8
    spectral_shift: Literal["auto"] | float = "auto"
    seed: int = 0
    block_size: int = 16384

    def __post_init__(self) -> None:
        if self.method not in ("eig", "svd"):
            raise ValueError(f"unknown factorization {self.method!r} (eig or svd)")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.n_power_iter < 0 or (self.n_oversamples is not None and self.n_oversamples < 0):
            raise ValueError("n_power_iter and n_oversamples must be >= 0")
        if self.spectral_shift != "auto" and not isinstance(self.spectral_shift, int | float):
            raise ValueError(f"spectral_shift must be 'auto' or a number, got {self.spectral_shift!r}")

    @property
    def oversamples(self) -> int:
        return self.n_oversamples if self.n_oversamples is not None else max(self.dim, 16)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Factorization:
    """Selected eigenpairs and the embedding built from them.

    ``eigenvalues`` are the matrix's own eigenvalues for ``eig`` (descending) or singular values for ``svd``, before
    the power is applied, one per embedding column. ``ritz_values`` are all k selected before dropping non-positive
    ones (``eig``), for diagnostics.
    """

    embedding: np.ndarray  # (m, k_eff) float32
    eigenvalues: np.ndarray  # (k_eff,) float64
    vectors: np.ndarray  # (m, k_eff) float64, orthonormal columns
    ritz_values: np.ndarray  # (k,) float64
    n_positive: int
    dim_requested: int
    shift: float
    seconds: float


def to_dask(a: sp.spmatrix, block_size: int) -> da.Array:
    """A scipy sparse matrix as a Dask array of ``csr_matrix`` row blocks, each with every column.

    Row blocks only: with square blocks, ``A @ Q`` is a sum over (m / block)^2 block products, each writing a
    dense block x width partial result even where the sparse block is empty; at 10^6 labels that is 61 x the
    output's size in dense traffic per multiply. One column chunk makes it one product per row block.

    The values are float32 (see :func:`_times`).
    """
    m, n = a.shape
    chunks = (min(block_size, max(m, 1)), max(n, 1))
    return da.from_array(sp.csr_matrix(a, dtype=PRODUCT_DTYPE), chunks=chunks, asarray=False, fancy=False)


#: ``A @ Q`` is computed in float32. The sparse x dense product reads a row of Q per nonzero of A and is bound
#: by memory traffic; it is most of the factorization's time at scale (10^8 annotations: 98 million nonzeros).
#: float32 halves that traffic and A's memory, and made the product 1.7-2.5x as fast (bench/design_changes.py);
#: its relative error, about 2e-7 per product, is far below the randomized approximation's. Orthonormalization
#: and the small eigenproblem stay in float64.
PRODUCT_DTYPE = np.float32


def _times(a_dask: da.Array, q: da.Array) -> da.Array:
    """``A @ Q`` as one sparse x dense product per row block of A, with Q gathered once into one chunk; in
    float32, returned as float64."""
    return da.dot(a_dask, q.astype(PRODUCT_DTYPE).rechunk({0: -1})).astype(np.float64)


def _gaussian_block(seed: int, block: int, n_rows: int, width: int) -> np.ndarray:
    return np.random.default_rng([seed, block]).standard_normal((n_rows, width))


def _gaussian(seed: int, rows: tuple[int, ...], width: int) -> da.Array:
    """An m x width standard normal matrix as row blocks, each from its own seeded stream: the same numbers
    wherever and in whatever order the blocks are drawn, and m x width floats never in one process."""
    blocks = [
        da.from_delayed(dask.delayed(_gaussian_block)(seed, i, n, width), shape=(n, width), dtype=np.float64)
        for i, n in enumerate(rows)
    ]
    return da.concatenate(blocks, axis=0)


def _orthonormal(y: da.Array) -> da.Array:
    """An orthonormal basis of ``y``'s columns by CholeskyQR2 (Fukaya et al. 2014), or a tall-skinny Householder
    QR where ``y`` is too ill-conditioned for it.

    CholeskyQR: ``Q = Y R^-1`` with ``R^T R = Y^T Y``. Its work is two matrix products per pass, done block by
    block where the blocks are, and only the small l x l Gram matrix travels: 1.3-1.5x as fast as Dask's
    ``tsqr`` (a Householder QR of every block, then a product to form Q) at 100,000 x 512
    (bench/design_changes.py). One pass loses orthogonality
    as cond(Y)^2; the second pass, on a nearly orthonormal Q, restores it to rounding. Cholesky fails (or the
    result is not orthonormal) when cond(Y) nears 1e8, e.g. when Y is rank-deficient: then ``tsqr``.
    """
    y = y.persist()
    q = y
    for i in range(2):
        gram = da.dot(q.T, q).compute()
        try:
            r = scipy.linalg.cholesky((gram + gram.T) / 2, lower=False)
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            return da.linalg.tsqr(y)[0]
        if not np.isfinite(r).all() or np.linalg.cond(r) > MAX_CHOLESKY_QR_COND:
            return da.linalg.tsqr(y)[0]
        q = da.dot(q, scipy.linalg.solve_triangular(r, np.eye(r.shape[0]), lower=False))
        if i == 0:
            q = q.persist()  # the second pass reads it twice
    return q


#: Largest condition number of ``Y`` (estimated as R's) for which CholeskyQR2 is used: its error grows as
#: cond(Y)^2 times the rounding unit, so beyond about 1e8 the Gram matrix is numerically singular.
MAX_CHOLESKY_QR_COND = 1e7


def _flip_signs(vectors: np.ndarray) -> np.ndarray:
    """Make each vector's largest-magnitude entry positive: a deterministic sign for an eigenvector."""
    if vectors.size == 0:
        return vectors
    idx = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def randomized_eigh(
    a: sp.spmatrix | np.ndarray,
    k: int,
    *,
    n_oversamples: int = 16,
    n_power_iter: int = 8,
    which: Literal["LA", "LM"] = "LA",
    spectral_shift: Literal["auto"] | float = 0.0,
    seed: int = 0,
    init: np.ndarray | None = None,
    block_size: int = 16384,
    progress: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Approximate top-k eigenpairs of a symmetric matrix: largest algebraic (``LA``) or magnitude (``LM``).

    Returns ``(eigenvalues, vectors, shift)`` with eigenvalues ordered as selected (descending, by value or by
    magnitude). ``init`` (m x j, j <= k + oversamples) seeds the first sketch columns, e.g. the previous version's
    eigenvectors: a warm start converges in fewer iterations. When the sketch width reaches m the decomposition is
    exact (dense ``eigh``).
    """
    m = a.shape[0]
    if a.shape != (m, m):
        raise ValueError(f"matrix must be square, got {a.shape}")
    k = min(k, m)
    width = min(m, k + n_oversamples)
    if width >= m:
        dense = a.toarray() if sp.issparse(a) else np.asarray(a)
        values, vectors = scipy.linalg.eigh((dense + dense.T) / 2)
        order = np.argsort(-values if which == "LA" else -np.abs(values), kind="stable")[:k]
        return values[order], _flip_signs(vectors[:, order]), 0.0

    a_dask = to_dask(a, block_size).persist()
    rows = a_dask.chunks[0]
    j = min(init.shape[1], width) if init is not None else 0
    sketch = _gaussian(seed, rows, width - j)  # drawn block by block where it is used, never whole on the client
    if j:
        start = da.from_array(np.asarray(init[:, :j], np.float64), chunks=(rows, j))
        sketch = da.concatenate([start, sketch], axis=1) if width > j else start
    q = _orthonormal(sketch.rechunk((rows, width)))
    shift = 0.0

    def step(q: da.Array, shift: float) -> da.Array:
        y = _times(a_dask, q)
        if shift:
            y = y + shift * q
        return _orthonormal(y).persist()

    q = step(q, 0.0)
    if which == "LA" and spectral_shift != 0:
        if spectral_shift == "auto":
            ritz = np.linalg.eigvalsh(_projected(a_dask, q))
            shift = max(0.0, -float(ritz[0]))
        else:
            shift = float(spectral_shift)
    for i in range(n_power_iter):
        q = step(q, shift)
        fault_point("factorize:iteration")
        if progress:
            progress(f"power iteration {i + 1}/{n_power_iter}")
    small = _projected(a_dask, q)
    values, w = np.linalg.eigh(small)
    order = np.argsort(-values if which == "LA" else -np.abs(values), kind="stable")[:k]
    vectors = da.dot(q, w[:, order]).compute()
    return values[order], _flip_signs(vectors), shift


def _projected(a_dask: da.Array, q: da.Array) -> np.ndarray:
    """``Q^T A Q``, symmetrised against rounding."""
    small = da.dot(q.T, _times(a_dask, q)).compute()
    return (small + small.T) / 2


def factorize(
    a: sp.spmatrix,
    params: FactorizeParams = FactorizeParams(),
    client: Client | None = None,
    *,
    init: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
) -> Factorization:
    """Embedding of the PMI matrix ``a`` per ``params`` (see the module docstring for the method)."""
    start = time.perf_counter()
    which = "LA" if params.method == "eig" else "LM"
    if client is not None:
        ctx = dask.config.set(scheduler=client)  # worker processes already run BLAS on one thread each
    elif math.ceil(a.shape[0] / params.block_size) > 1:
        # Dask's threads already run one block per core: multithreaded BLAS on top of them oversubscribes the
        # cores (measured 3-6x slower on a loaded 2-core machine, bench/embed.py). One block: let BLAS thread.
        ctx = contextlib.ExitStack()
        ctx.enter_context(dask.config.set(scheduler="threads"))
        ctx.enter_context(threadpool_limits(1, user_api="blas"))
    else:
        ctx = dask.config.set(scheduler="threads")
    with ctx:
        values, vectors, shift = randomized_eigh(
            a,
            params.dim,
            n_oversamples=params.oversamples,
            n_power_iter=params.n_power_iter,
            which=which,
            spectral_shift=params.spectral_shift,
            seed=params.seed,
            init=init,
            block_size=params.block_size,
            progress=progress,
        )
    if params.method == "eig":
        keep = values > 0
        n_positive = int(keep.sum())
        if n_positive < params.dim:
            log.warning(
                "only %d of the top %d eigenvalues are positive: the embedding has %d dimensions",
                n_positive,
                params.dim,
                n_positive,
            )
        kept_values, kept_vectors = values[keep], vectors[:, keep]
    else:
        n_positive = int((values > 0).sum())
        kept_values, kept_vectors = np.abs(values), vectors
    scale = np.abs(kept_values) ** params.power if params.power else np.ones_like(kept_values)
    embedding = (kept_vectors * scale).astype(np.float32)
    return Factorization(
        embedding,
        kept_values.astype(np.float64),
        kept_vectors,
        values,
        n_positive,
        params.dim,
        shift,
        time.perf_counter() - start,
    )
