"""Nearest labels on the embedding sphere (cosine proximity)."""

from __future__ import annotations

import numpy as np

from pmi_pipeline.store import EmbeddingVersion


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """L2-normalised rows; all-zero rows stay zero (a label with no positive-eigenvalue component)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def nearest_labels(version: EmbeddingVersion, label: str, n: int = 10) -> list[tuple[str, float]]:
    """The ``n`` labels with the highest cosine to ``label``, excluding itself, best first."""
    unit = normalize_rows(version.embedding.astype(np.float64))
    i = version.index()[label]
    cosines = unit @ unit[i]
    cosines[i] = -np.inf
    n = min(n, len(version.labels) - 1)
    top = np.argpartition(-cosines, n - 1)[:n] if n > 0 else np.empty(0, int)
    top = top[np.argsort(-cosines[top], kind="stable")]
    return [(version.labels[j], float(cosines[j])) for j in top]
