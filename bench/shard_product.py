"""Pair counts of single shards two ways, in milliseconds per shard, on a corpus's first ``--shards`` shards
(read beforehand, not timed), each shard on its own label codes:

- ``library``: ``distinct_pairs`` and a ``PairCounter`` (what a count task does);
- ``sparse product``: the shard's ``Y.T @ Y`` with scipy, then its strict upper triangle.

::

    python bench/shard_product.py /tmp/corpus --shards 20

writes bench/results/shard-product-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from common import host_speed, interleaved, write_result

from pmi_pipeline.cooccurrence import PairCounter, distinct_pairs
from pmi_pipeline.shards import ShardCodes, discover_shards, read_shard_codes


def local_codes(shard: ShardCodes) -> tuple[np.ndarray, int]:
    """Each annotation's label as a code among the labels the shard uses, and how many it uses."""
    used = np.flatnonzero(np.bincount(shard.entry_codes, minlength=len(shard.dictionary)))
    rank = np.zeros(len(shard.dictionary), np.int32)
    rank[used] = np.arange(used.size, dtype=np.int32)
    return rank[shard.entry_codes], used.size


def library(shards: list[ShardCodes]) -> int:
    pairs = 0
    for shard in shards:
        codes, m = local_codes(shard)
        counter = PairCounter(m, max_examples=shard.n_examples)
        counter.add(*distinct_pairs(shard.example_codes, codes, m))
        pairs += counter.result().nnz
    return pairs


def sparse_product(shards: list[ShardCodes]) -> int:
    pairs = 0
    for shard in shards:
        codes, m = local_codes(shard)
        indptr = np.searchsorted(shard.example_codes, np.arange(shard.n_examples + 1))
        y = sp.csr_matrix((np.ones(codes.size, np.int32), codes, indptr), shape=(shard.n_examples, m))
        pairs += sp.triu(y.T.tocsr() @ y, k=1, format="csr").nnz
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="a corpus written by `pmi-pipeline synth`")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    shards = [read_shard_codes(p) for p in discover_shards([args.corpus])[: args.shards]]
    seconds, results, _ = interleaved(
        {"library": lambda: library(shards), "sparse product": lambda: sparse_product(shards)}, args.repeat
    )
    if results["library"] != results["sparse product"]:
        raise SystemExit(f"the two ways found different pairs: {results}")
    ms = {way: min(times) / len(shards) * 1e3 for way, times in seconds.items()}
    print(", ".join(f"{way} {v:.1f} ms" for way, v in ms.items()) + f" per shard ({results['library']:,} pairs)")
    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": host_speed(),
        "corpus": str(args.corpus),
        "shards": len(shards),
        "ms_per_shard": ms,
        "seconds": seconds,
    }
    print(f"wrote {write_result('shard-product', out)}")


if __name__ == "__main__":
    main()
