"""Accuracy of the randomized eigendecomposition against ARPACK (``scipy.sparse.linalg.eigsh``) on real PMI matrices.

For each dataset in data/ and PMI variant, sweeps oversampling, power iterations and the spectral shift at k = 64 and
reports the largest relative error of the top-k algebraic eigenvalues, over all k and over the top half, with the
time of each run and of eigsh in the same process. Writes bench/results/factorization-accuracy-<time>.json and
prints a Markdown table (pasted into docs/factorization.md).

    python bench/factorization_accuracy.py [--k 64] [--datasets delicious eurlex]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import write_result
from scipy.sparse.linalg import eigsh

from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.factorize import randomized_eigh
from pmi_pipeline.pmi import PMIParams, pmi_matrix
from pmi_pipeline.shards import discover_shards

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--datasets", nargs="+", default=["delicious", "eurlex"])
    parser.add_argument("--oversamples", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--iters", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        counts = count_shards(discover_shards([ROOT / "data" / dataset])).counts
        for variant in ("pmi", "ppmi"):
            a, _ = pmi_matrix(counts, PMIParams(variant=variant))
            start = time.perf_counter()
            reference = eigsh(a, k=args.k, which="LA", return_eigenvectors=False)[::-1]
            eigsh_s = time.perf_counter() - start
            smallest = float(eigsh(a, k=1, which="SA", return_eigenvectors=False)[0])
            for p in args.oversamples:
                for shift in (0.0, "auto"):
                    for q in args.iters:
                        start = time.perf_counter()
                        values, _, used = randomized_eigh(
                            a, args.k, n_oversamples=p, n_power_iter=q, spectral_shift=shift
                        )
                        seconds = time.perf_counter() - start
                        rel = np.abs(values - reference) / np.abs(reference)
                        rows.append(
                            {
                                "dataset": dataset,
                                "pmi": variant,
                                "m": a.shape[0],
                                "nnz": int(a.nnz),
                                "k": args.k,
                                "oversamples": p,
                                "power_iter": q,
                                "shift": shift,
                                "shift_used": used,
                                "max_rel_err": float(rel.max()),
                                "max_rel_err_top_half": float(rel[: args.k // 2].max()),
                                "seconds": seconds,
                                "eigsh_seconds": eigsh_s,
                                "lambda_1": float(reference[0]),
                                "lambda_k": float(reference[-1]),
                                "lambda_min": smallest,
                            }
                        )
                        print(json.dumps(rows[-1]), flush=True)
    out = write_result("factorization-accuracy", rows)
    print(f"\nwrote {out}\n")
    print(
        "| dataset | PMI | m | lambda_1 / lambda_k / lambda_min | oversamples | shift | iters | max rel. error "
        "(all k / top k/2) | time (eigsh) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['pmi']} | {r['m']} | {r['lambda_1']:.0f} / {r['lambda_k']:.1f} / "
            f"{r['lambda_min']:.0f} | {r['oversamples']} | {r['shift']} | {r['power_iter']} | "
            f"{r['max_rel_err']:.1e} / {r['max_rel_err_top_half']:.1e} | {r['seconds']:.2f}s "
            f"({r['eigsh_seconds']:.2f}s) |"
        )


if __name__ == "__main__":
    main()
