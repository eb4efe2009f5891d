"""Pointwise mutual information between labels, from counts, as a sparse symmetric matrix.

``PMI(i, j) = log(p(i, j) / (p(i) p(j)))`` with ``p(i) = n_i / N`` and ``p(i, j) = n_ij / N`` over N examples,
on observed pairs only, the diagonal dropped and unobserved pairs left at 0 (Chollet 2016, and the seed blog).
The variants are those Levy, Goldberg and Dagan (2015) found to matter for word embeddings:

- ``ppmi``: positive PMI, ``max(PMI, 0)``;
- ``shift`` s: subtract ``log s`` (shifted PMI, the SGNS correspondence with s negative samples);
- ``smoothing`` alpha: marginals from ``n_i ** alpha`` (context-distribution smoothing, 0.75 in word2vec),
  rescaled to keep their total mass. Labels are both "words" and "contexts" here, so both marginals are smoothed
  and the matrix stays symmetric, as the eigendecomposition needs;
- ``min_count`` / ``min_pair_count``: labels and pairs seen fewer times are dropped (pairs become unobserved).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp

from pmi_pipeline.cooccurrence import Counts

PMIVariant = Literal["pmi", "ppmi"]


@dataclass(frozen=True)
class PMIParams:
    variant: PMIVariant = "pmi"
    shift: float = 1.0
    smoothing: float = 1.0
    min_count: int = 1
    min_pair_count: int = 1

    def __post_init__(self) -> None:
        if self.variant not in ("pmi", "ppmi"):
            raise ValueError(f"unknown PMI variant {self.variant!r} (pmi or ppmi)")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if self.min_count < 1 or self.min_pair_count < 1:
            raise ValueError("min_count and min_pair_count must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def log_marginals(label_counts: np.ndarray, n_examples: int, smoothing: float = 1.0) -> np.ndarray:
    """``log p(i)``, optionally smoothed: ``p_a(i) = n_i^a / sum(n^a) * sum(n) / N`` (equals n_i / N at a = 1)."""
    counts = np.asarray(label_counts, dtype=np.float64)
    if smoothing == 1.0:
        return np.log(counts) - np.log(n_examples)
    powered = counts**smoothing
    return np.log(powered) - np.log(powered.sum()) + np.log(counts.sum()) - np.log(n_examples)


def pmi_matrix(counts: Counts, params: PMIParams = PMIParams()) -> tuple[sp.csr_matrix, np.ndarray]:
    """The symmetric PMI matrix over the labels that pass ``min_count``, and their indices in ``counts``.

    Entries exist only for observed pairs (for ``ppmi``, only positive ones); the diagonal is empty.
    """
    if counts.n_examples <= 0:
        raise ValueError("no examples counted")
    kept = np.flatnonzero(counts.label_counts >= params.min_count)
    m = kept.size
    pairs = counts.pairs[kept][:, kept].tocoo()
    keep_pair = pairs.data >= params.min_pair_count
    rows, cols, n_ij = pairs.row[keep_pair], pairs.col[keep_pair], pairs.data[keep_pair].astype(np.float64)
    log_p = log_marginals(counts.label_counts[kept], counts.n_examples, params.smoothing)
    values = np.log(n_ij) - np.log(counts.n_examples) - log_p[rows] - log_p[cols] - np.log(params.shift)
    if params.variant == "ppmi":
        positive = values > 0
        rows, cols, values = rows[positive], cols[positive], values[positive]
    upper = sp.csr_matrix((values, (rows, cols)), shape=(m, m))
    return (upper + upper.T).tocsr(), kept
