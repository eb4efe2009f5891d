"""Before and after, in one process: the three design changes of the scale work (issue 5).

1. Pair counting per shard: ``triu(Y.T @ Y)`` with scipy (before) against enumerating each example's label pairs
   and counting their keys by sorting (``cooccurrence.upper_pair_counts``, after), on one synthetic shard.
2. Merging two per-shard counts: the sorted union of the vocabularies with Python sets and ``sorted`` plus two
   hash lookups (before) against one Arrow hash pass and sort (``cooccurrence._sorted_union``, after).
3. ``A @ Q`` in the factorization: the PMI matrix in square blocks (before) against row blocks with every column
   (``factorize.to_dask``, after), on Dask's threaded scheduler; and then the row-block product in float64
   (before) against float32 (``factorize._times``, after).
4. Counting several shards: each shard counted alone and the counts merged (before, ``batch_bytes=1``) against
   batches of shards sharing one vocabulary and one pass over their pairs (``cooccurrence.count_batch``, after),
   in one process.
5. Orthonormalizing the m x l sketch in each power iteration: Dask's ``tsqr`` (before) against CholeskyQR2
   (``factorize._orthonormal``, after), on Dask's threaded scheduler with one BLAS thread per task, as
   ``factorize`` runs them.

Each pair runs on the same input, checks that both give the same result, and reports the best of ``--repeat``::

    python bench/design_changes.py --labels 100000

writes bench/results/design-changes-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
from common import best, write_result
from threadpoolctl import threadpool_limits

from pmi_pipeline.cooccurrence import _positions, _sorted_union, count_shards, upper_pair_counts
from pmi_pipeline.factorize import _orthonormal, _times, to_dask
from pmi_pipeline.shards import discover_shards, read_annotations
from pmi_pipeline.synth import SynthConfig, write_corpus


def pairs_before(example_codes: np.ndarray, label_codes: np.ndarray, m: int, n: int) -> sp.csr_matrix:
    y = sp.csr_matrix((np.ones(example_codes.size, np.int64), (example_codes, label_codes)), shape=(n, m))
    pairs = sp.triu((y.T.tocsr() @ y).tocsr(), k=1, format="csr")
    pairs.sum_duplicates()
    return pairs


def union_before(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.asarray(sorted(set(a.tolist()) | set(b.tolist())), dtype=object)
    return labels, _positions(a, labels), _positions(b, labels)


def matmul(a: sp.csr_matrix, q: np.ndarray, square: bool, block: int, dtype: type = np.float64) -> np.ndarray:
    """``A @ Q`` in square blocks or in row blocks, in float64 or float32 (as ``factorize._times`` does)."""
    qd = da.from_array(q.astype(dtype), chunks=(block, q.shape[1]))
    if square:
        ad = da.from_array(a.astype(dtype), chunks=(block, block), asarray=False, fancy=False)
        return da.dot(ad, qd).compute()
    ad = da.from_array(a.astype(dtype), chunks=(block, a.shape[1]), asarray=False, fancy=False)
    return da.dot(ad, qd.rechunk({0: -1})).compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=100000)
    parser.add_argument("--examples", type=int, default=250000, help="examples in the shard of comparison 1")
    parser.add_argument("--vocabulary", type=int, default=400000, help="labels per side in comparison 2")
    parser.add_argument("--m", type=int, default=60000, help="matrix size in comparison 3")
    parser.add_argument("--shards", type=int, default=40, help="shards in comparison 4")
    parser.add_argument("--shard-examples", type=int, default=50000, help="examples per shard in comparison 4")
    parser.add_argument("--qr-rows", type=int, default=100000, help="rows of the sketch in comparison 5")
    parser.add_argument("--qr-width", type=int, default=512, help="columns of the sketch in comparison 5")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "args": vars(args)}
    results["load_average_at_start"] = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        config = SynthConfig(n_examples=args.examples, n_labels=args.labels, shard_size=args.examples)
        write_corpus(tmp, config, progress=False)
        ann = read_annotations(next(Path(tmp).rglob("*.parquet")))
    m, n = ann.labels.size, ann.n_examples
    t0, before = best(args.repeat, lambda: pairs_before(ann.example_codes, ann.label_codes, m, n))
    t1, after = best(args.repeat, lambda: upper_pair_counts(ann.example_codes, ann.label_codes, m))
    assert (before != after).nnz == 0
    results["pair_counting"] = {"annotations": ann.n_annotations, "before_s": t0, "after_s": t1, "speedup": t0 / t1}

    rng = np.random.default_rng(0)
    side = [
        np.asarray(sorted({f"label-{i:07d}" for i in rng.integers(0, 10**6, args.vocabulary)}), dtype=object)
        for _ in range(2)
    ]
    t0, before = best(args.repeat, lambda: union_before(*side))
    t1, after = best(args.repeat, lambda: _sorted_union(*side))
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))
    results["vocabulary_union"] = {"labels": int(after[0].size), "before_s": t0, "after_s": t1, "speedup": t0 / t1}

    nnz = 30 * args.m
    r, c = rng.integers(0, args.m, nnz), rng.integers(0, args.m, nnz)
    a = sp.csr_matrix((rng.standard_normal(nnz), (r, c)), shape=(args.m, args.m))
    a = (a + a.T).tocsr()
    q = rng.standard_normal((args.m, 512))
    with dask.config.set(scheduler="threads"):
        t0, before = best(args.repeat, lambda: matmul(a, q, True, 16384))
        t1, after = best(args.repeat, lambda: matmul(a, q, False, 16384))
        t2, single = best(args.repeat, lambda: _times(to_dask(a, 16384), da.from_array(q, chunks=16384)).compute())
    np.testing.assert_allclose(before, after, rtol=1e-9, atol=1e-9)
    error = float(np.linalg.norm(single - after) / np.linalg.norm(after))
    assert error < 1e-5, error
    results["factorize_matmul"] = {"m": args.m, "nnz": int(a.nnz), "before_s": t0, "after_s": t1, "speedup": t0 / t1}
    results["float32_matmul"] = {
        "m": args.m,
        "nnz": int(a.nnz),
        "before_s": t1,
        "after_s": t2,
        "speedup": t1 / t2,
        "relative_error": error,
    }

    with tempfile.TemporaryDirectory() as tmp:
        config = SynthConfig(
            n_examples=args.shard_examples * args.shards, n_labels=args.labels, shard_size=args.shard_examples
        )
        write_corpus(tmp, config, progress=False)
        paths = discover_shards([tmp])
        t0, before = best(args.repeat, lambda: count_shards(paths, batch_bytes=1).counts)
        t1, after = best(args.repeat, lambda: count_shards(paths).counts)
    assert before.equals(after)
    results["batched_counting"] = {
        "shards": len(paths),
        "annotations": after.n_annotations,
        "before_s": t0,
        "after_s": t1,
        "speedup": t0 / t1,
    }

    y = rng.standard_normal((args.qr_rows, args.qr_width))
    yd = da.from_array(y, chunks=(16384, args.qr_width))
    with dask.config.set(scheduler="threads"), threadpool_limits(1, user_api="blas"):
        t0, before = best(args.repeat, lambda: da.linalg.tsqr(yd)[0].compute())
        t1, after = best(args.repeat, lambda: _orthonormal(yd).compute())
    for q in (before, after):
        np.testing.assert_allclose(q.T @ q, np.eye(args.qr_width), atol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(before * after, axis=0)), 1, rtol=1e-8)  # same basis up to signs
    results["orthonormalize"] = {
        "rows": args.qr_rows,
        "width": args.qr_width,
        "before_s": t0,
        "after_s": t1,
        "speedup": t0 / t1,
    }

    results["load_average_at_end"] = os.getloadavg()
    names = ("pair_counting", "vocabulary_union", "factorize_matmul", "float32_matmul", "batched_counting")
    for name in (*names, "orthonormalize"):
        r = results[name]
        print(f"{name:18s} before {r['before_s']:7.3f} s  after {r['after_s']:7.3f} s  {r['speedup']:5.2f}x")
    out = write_result("design-changes", results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
