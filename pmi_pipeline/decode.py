"""Decode predicted embeddings into ranked labels: cosine proximity to every label, top-k, on the device.

The cosine head predicts a point ``e~`` in the label embedding space; its labels are those whose embeddings
are closest by cosine (Chollet 2016, section 3.2). With the label embeddings L2-normalized once, the scores of
a batch of queries are one matrix product ``normalize(Q) @ E_n^T``; :func:`cosine_topk` runs it in query
batches and, for very many labels, in label chunks whose top-k lists are merged, so that the score block never
exceeds ``query_batch x label_chunk`` floats. Everything stays on the device of the embeddings (a GPU when
present).

The BCE baseline ranks labels by its logits; :func:`scores_topk` does the same batched top-k for any score
function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CosineDecoder", "cosine_topk", "l2_normalize", "scores_topk"]


def l2_normalize(x: torch.Tensor | np.ndarray, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm; an all-zero row stays zero (its cosine with anything is 0)."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.float()
    return F.normalize(t, p=2.0, dim=-1, eps=eps)


def _merge_topk(
    best_vals: torch.Tensor | None,
    best_idx: torch.Tensor | None,
    vals: torch.Tensor,
    idx: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    if best_vals is None or best_idx is None:
        return vals, idx
    all_vals = torch.cat([best_vals, vals], dim=1)
    all_idx = torch.cat([best_idx, idx], dim=1)
    top_vals, pos = torch.topk(all_vals, k=min(k, all_vals.shape[1]), dim=1)
    return top_vals, torch.gather(all_idx, 1, pos)


def scores_topk(
    queries: torch.Tensor,
    score_fn: Callable[[torch.Tensor, int, int], torch.Tensor],
    n_labels: int,
    k: int,
    *,
    query_batch: int = 1024,
    label_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched top-k of ``score_fn(query_block, start, stop) -> (b, stop - start)`` over ``n_labels`` labels.

    Returns ``(values, indices)``, each ``(n, min(k, n_labels))``, sorted best first, on the queries' device.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_eff = min(k, n_labels)
    chunk = n_labels if label_chunk is None else max(1, int(label_chunk))
    out_vals, out_idx = [], []
    for q0 in range(0, queries.shape[0], query_batch):
        q = queries[q0 : q0 + query_batch]
        best_vals = best_idx = None
        for l0 in range(0, n_labels, chunk):
            l1 = min(n_labels, l0 + chunk)
            scores = score_fn(q, l0, l1).float()
            vals, idx = torch.topk(scores, k=min(k_eff, l1 - l0), dim=1)
            best_vals, best_idx = _merge_topk(best_vals, best_idx, vals, idx + l0, k_eff)
        assert best_vals is not None and best_idx is not None
        out_vals.append(best_vals)
        out_idx.append(best_idx)
    if not out_vals:
        empty = torch.empty((0, k_eff), device=queries.device)
        return empty, empty.long()
    return torch.cat(out_vals), torch.cat(out_idx)


def cosine_topk(
    queries: torch.Tensor,
    label_embeddings_normalized: torch.Tensor,
    k: int,
    *,
    query_batch: int = 1024,
    label_chunk: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k labels by cosine between each query row and the (already L2-normalized) label embeddings.

    ``queries`` need not be normalized. ``matmul_dtype`` (e.g. ``torch.bfloat16`` on a GPU) runs the product
    in lower precision; the scores are compared in float32. Near-ties may then order differently than in
    float32. Returns ``(cosines, label_indices)`` on the embeddings' device.
    """
    E = label_embeddings_normalized
    if queries.shape[-1] != E.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[-1]}, embeddings {E.shape[1]}")
    Q = l2_normalize(queries.to(E.device, non_blocking=True).float())
    if matmul_dtype is not None:
        Q = Q.to(matmul_dtype)
        E = E.to(matmul_dtype)

    def score(q: torch.Tensor, l0: int, l1: int) -> torch.Tensor:
        return q @ E[l0:l1].T

    return scores_topk(Q, score, E.shape[0], k, query_batch=query_batch, label_chunk=label_chunk)


class CosineDecoder:
    """Label embeddings normalized once and kept on a device; ``topk(queries, k)`` decodes a batch.

    >>> dec = CosineDecoder(np.eye(3, dtype=np.float32))
    >>> dec.topk(torch.tensor([[0.1, 2.0, 0.0]]), k=2)[1].tolist()
    [[1, 0]]
    """

    def __init__(
        self,
        embedding: np.ndarray | torch.Tensor,
        device: str | torch.device = "cpu",
        *,
        query_batch: int = 1024,
        label_chunk: int | None = None,
        matmul_dtype: torch.dtype | None = None,
    ):
        self.device = torch.device(device)
        self.embedding = l2_normalize(torch.as_tensor(embedding, dtype=torch.float32)).to(self.device)
        self.query_batch = query_batch
        self.label_chunk = label_chunk
        self.matmul_dtype = matmul_dtype

    @property
    def n_labels(self) -> int:
        return int(self.embedding.shape[0])

    @torch.no_grad()
    def topk(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cosine_topk(
            torch.as_tensor(queries),
            self.embedding,
            k,
            query_batch=self.query_batch,
            label_chunk=self.label_chunk,
            matmul_dtype=self.matmul_dtype,
        )
