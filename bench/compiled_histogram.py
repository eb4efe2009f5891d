"""What a compiled kernel would gain where pair counts go into a histogram (up to 2,048 labels), before deciding
whether the project should depend on numba: the library's ``PairCounter`` (keys enumerated by size class, sorted
and counted into the histogram) against a numba kernel that adds each example's pairs to the histogram directly,
on a corpus's first ``--shards`` shards, over the run's sorted vocabulary. Also measures what importing numba adds
to a process's RSS (each Dask worker would pay it). Needs numba, which is not a dependency of the project
(``pip install numba`` into the virtual environment)::

    python bench/compiled_histogram.py /tmp/corpus --shards 40

writes bench/results/compiled-histogram-<time>.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import psutil
from common import interleaved, kernel_report, write_result

from pmi_pipeline import cooccurrence
from pmi_pipeline.shards import discover_shards, distinct_pairs, read_shard_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    shards = [read_shard_codes(p) for p in discover_shards([args.corpus])[: args.shards]]
    labels, positions = cooccurrence._Vocabulary().locate([s.dictionary for s in shards])
    m = labels.size
    if not cooccurrence._pairs_in_histogram(m):
        raise SystemExit(f"{m} labels: pair counts go into a histogram only up to 2,048 labels")
    codes = []
    for shard, position in zip(shards, positions, strict=True):
        rank = np.asarray(position, np.int32)
        codes.append(distinct_pairs(shard.example_codes, rank[shard.entry_codes], m))

    process = psutil.Process()
    before = process.memory_info().rss
    import numba

    imported = process.memory_info().rss

    @numba.njit(nogil=True)
    def add_pairs(example_codes: np.ndarray, label_codes: np.ndarray, m: int, histogram: np.ndarray) -> None:
        n, start = example_codes.size, 0
        while start < n:
            end = start + 1
            while end < n and example_codes[end] == example_codes[start]:
                end += 1
            for i in range(start, end - 1):
                row = label_codes[i] * m
                for j in range(i + 1, end):
                    histogram[row + label_codes[j]] += 1
            start = end

    def compiled() -> np.ndarray:
        histogram = np.zeros(m * m, np.int32)
        for example_codes, label_codes in codes:
            add_pairs(example_codes, label_codes, m, histogram)
        return np.triu(histogram.reshape(m, m), 1)

    def library() -> np.ndarray:
        counter = cooccurrence.PairCounter(m, max_examples=2**31 - 2)
        for example_codes, label_codes in codes:
            counter.add(example_codes, label_codes)
        return counter.result().toarray()

    seconds, results, compile_s = interleaved({"library": library, "compiled": compiled}, args.repeat)
    if not np.array_equal(results["library"], results["compiled"]):
        raise AssertionError("the compiled kernel's counts differ from the library's")
    out, best = kernel_report(
        seconds,
        corpus=str(args.corpus),
        n_shards=len(codes),
        n_labels=m,
        numba=numba.__version__,
        numba_import_mib=(imported - before) / 2**20,
        first_call_s=compile_s,
    )
    print(
        f"{len(codes)} shards over {m:,} labels: {best}, same counts; numba {numba.__version__}: import +"
        f"{out['numba_import_mib']:.0f} MiB RSS, first call {compile_s:.2f} s"
    )
    print(f"wrote {write_result('compiled-histogram', out)}")


if __name__ == "__main__":
    main()
