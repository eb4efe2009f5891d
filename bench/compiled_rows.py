"""Whether a compiled row-by-row kernel would count a batch's pairs faster than the library at any number of
labels, before deciding whether the project should depend on numba: the library's ``PairCounter`` (pair keys
enumerated by size class, sorted, CSR parts added) against Gustavson's algorithm in numba (the annotations
bucketed by label; for each label a, the labels after it in each of its examples added to a dense accumulator of
``m`` cells, and row a written out in column order), on a corpus's first ``--shards`` shards taken as one batch,
over their sorted vocabulary. Needs numba, which is not a dependency of the project (``pip install numba``)::

    python bench/compiled_rows.py /tmp/corpus --shards 10

checks that both give the same counts and writes bench/results/compiled-rows-<time>.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import interleaved, kernel_report, write_result

from pmi_pipeline import cooccurrence
from pmi_pipeline.shards import discover_shards, distinct_pairs, read_shard_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import numba

    @numba.njit(nogil=True)
    def rows(example_codes, label_codes, m):  # type: ignore[no-untyped-def]
        n = label_codes.size
        end_of = np.empty(n, np.int64)  # where each annotation's example ends
        count = np.zeros(m + 1, np.int64)
        pairs, start = 0, 0
        while start < n:
            end = start + 1
            while end < n and example_codes[end] == example_codes[start]:
                end += 1
            for i in range(start, end):
                end_of[i] = end
            for i in range(start, end - 1):
                count[label_codes[i] + 1] += 1
            pairs += (end - start) * (end - start - 1) // 2
            start = end
        for a in range(m):
            count[a + 1] += count[a]
        by_label = np.empty(count[m], np.int64)  # annotations with labels after them, bucketed by label
        fill = count[:m].copy()
        for i in range(n):
            if end_of[i] > i + 1:
                by_label[fill[label_codes[i]]] = i
                fill[label_codes[i]] += 1
        acc, mark, touched = np.zeros(m, np.int32), np.full(m, -1, np.int64), np.empty(m, np.int64)
        indptr, indices, data = np.zeros(m + 1, np.int64), np.empty(pairs, np.int32), np.empty(pairs, np.int32)
        nnz = 0
        for a in range(m):
            k = 0
            for o in range(count[a], count[a + 1]):
                i = by_label[o]
                for j in range(i + 1, end_of[i]):
                    b = label_codes[j]
                    if mark[b] != a:
                        mark[b], touched[k], acc[b] = a, b, 1
                        k += 1
                    else:
                        acc[b] += 1
            if k:
                if k * 16 > m - a:  # many columns: scan them in order
                    for b in range(a + 1, m):
                        if mark[b] == a:
                            indices[nnz], data[nnz] = b, acc[b]
                            nnz += 1
                else:
                    for b in np.sort(touched[:k]):
                        indices[nnz], data[nnz] = b, acc[b]
                        nnz += 1
            indptr[a + 1] = nnz
        return indptr, indices[:nnz].copy(), data[:nnz].copy()

    shards = [read_shard_codes(p) for p in discover_shards([args.corpus])[: args.shards]]
    labels, positions = cooccurrence._Vocabulary().locate([s.dictionary for s in shards])
    m = labels.size
    examples, codes, offset = [], [], 0
    for shard, position in zip(shards, positions, strict=True):
        e, c = distinct_pairs(shard.example_codes, np.asarray(position, np.int32)[shard.entry_codes], m)
        examples.append(e.astype(np.int64) + offset)  # the batch's examples, one numbering
        codes.append(c.astype(np.int32))
        offset += shard.n_examples
    batch_examples, batch_codes = np.concatenate(examples), np.concatenate(codes)

    def compiled():  # type: ignore[no-untyped-def]
        import scipy.sparse as sp

        indptr, indices, data = rows(batch_examples, batch_codes, m)
        return sp.csr_matrix((data, indices, indptr), shape=(m, m))

    def library():  # type: ignore[no-untyped-def]
        counter = cooccurrence.PairCounter(m, max_examples=2**31 - 2)
        for e, c in zip(examples, codes, strict=True):
            counter.add(e, c)
        return counter.result()

    seconds, results, compile_s = interleaved({"library": library, "compiled": compiled}, args.repeat)
    if (results["library"] != results["compiled"]).nnz:
        raise AssertionError("the compiled kernel's counts differ from the library's")
    out, best = kernel_report(
        seconds,
        corpus=str(args.corpus),
        n_shards=len(shards),
        n_labels=m,
        n_pairs=int(results["library"].nnz),
        numba=numba.__version__,
        first_call_s=compile_s,
    )
    print(f"{len(shards)} shards over {m:,} labels: {best}, same counts")
    print(f"wrote {write_result('compiled-rows', out)}")


if __name__ == "__main__":
    main()
