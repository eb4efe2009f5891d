"""Cosine decoding against a brute-force numpy ranking, including label chunking and query batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmi_pipeline.decode import CosineDecoder, cosine_topk, l2_normalize, scores_topk


def _numpy_topk(queries: np.ndarray, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    en = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = qn @ en.T
    idx = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cos, idx, axis=1), idx


def test_l2_normalize_keeps_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = l2_normalize(x)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


@pytest.mark.parametrize(("query_batch", "label_chunk"), [(1024, None), (7, None), (5, 13), (64, 1)])
def test_cosine_topk_matches_numpy(query_batch, label_chunk):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(101, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    vals, idx = cosine_topk(
        torch.from_numpy(queries),
        l2_normalize(torch.from_numpy(emb)),
        10,
        query_batch=query_batch,
        label_chunk=label_chunk,
    )
    ref_vals, ref_idx = _numpy_topk(queries, emb, 10)
    np.testing.assert_allclose(vals.numpy(), ref_vals, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)


def test_decoder_is_scale_invariant_and_caps_k():
    emb = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    dec = CosineDecoder(emb * np.array([[5], [0.1], [3]], dtype=np.float32))  # row norms must not matter
    vals, idx = dec.topk(torch.tensor([[2.0, 0.1], [0.0, 7.0]]), k=10)
    assert idx.shape == (2, 3)
    assert idx[:, 0].tolist() == [0, 1]
    assert torch.all(vals[:, :-1] >= vals[:, 1:])


def test_scores_topk_generic():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])

    def score(q, l0, l1):
        return q[:, l0:l1]

    _, idx = scores_topk(scores, score, 4, 2, query_batch=1, label_chunk=3)
    assert idx.tolist() == [[1, 3], [2, 0]]


def test_dimension_mismatch():
    with pytest.raises(ValueError):
        cosine_topk(torch.zeros(2, 3), torch.zeros(5, 4), 2)
