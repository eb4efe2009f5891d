"""What one merge of two partial sums costs, by part, on real partial sums of a corpus.

The two partial sums are each the sum of ``--batches`` batches of 5 consecutive shards (as a count task counts
them), from the start of the corpus and right after. Times the vocabulary union, the re-indexing, the sparse
addition and the whole ``_merge_pair`` (best of ``--repeat``)::

    python bench/merge_cost.py /tmp/corpus --batches 8

writes bench/results/merge-cost-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

from common import best, write_result

from pmi_pipeline.cooccurrence import Counts, _merge_pair, _sorted_union, count_batch
from pmi_pipeline.shards import discover_shards

SHARDS_PER_BATCH = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--batches", type=int, default=8, help="batches in each partial sum")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    paths = discover_shards([args.corpus])
    step = SHARDS_PER_BATCH

    def partial(first: int) -> Counts:
        starts = range(first, first + args.batches * step, step)
        return Counts.sum(count_batch(paths[s : s + step])[0] for s in starts)

    a, b = partial(0), partial(args.batches * step)
    union_s, (labels, pos_a, pos_b) = best(args.repeat, lambda: _sorted_union(a.labels, b.labels))
    reindex_s, (ra, rb) = best(args.repeat, lambda: (a.reindex(labels, pos_a), b.reindex(labels, pos_b)))
    add_s, _ = best(args.repeat, lambda: (ra.pairs + rb.pairs).tocsr())
    merge_s, merged = best(args.repeat, lambda: _merge_pair(a, b))
    n_in = a.n_pairs + b.n_pairs
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "corpus": str(args.corpus),
        "n_labels": [a.n_labels, b.n_labels, merged.n_labels],
        "n_pairs": [a.n_pairs, b.n_pairs, merged.n_pairs],
        "seconds": {"union": union_s, "reindex": reindex_s, "add": add_s, "merge": merge_s},
        "merge_ns_per_input_pair": merge_s / n_in * 1e9,
        "add_share_of_merge": add_s / merge_s,
    }
    out = write_result("merge-cost", result)
    print(
        f"{a.n_pairs:,} + {b.n_pairs:,} pairs -> {merged.n_pairs:,}: merge {merge_s * 1e3:.0f} ms "
        f"({result['merge_ns_per_input_pair']:.1f} ns per input pair); union {union_s * 1e3:.0f} ms, "
        f"re-index {reindex_s * 1e3:.0f} ms, addition {add_s * 1e3:.0f} ms ({result['add_share_of_merge']:.0%})"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
