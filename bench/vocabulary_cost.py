"""What moving and uniting the vocabularies of counts made in two processes costs, as when two Dask workers'
sums meet in the last merges of a count (``_merge_tile``).

The corpus's shards are counted in two halves, each in its own run (so that the two vocabularies are as
unrelated as two workers' are). Then, best of ``--repeat``, in milliseconds:

- ``pickle_python_strings`` / ``unpickle_python_strings``: one half's counts pickled with their labels as an
  object array of Python strings (how counts travelled before the fifteenth pass), and back;
- ``pickle_counts`` / ``unpickle_counts``: the same counts pickled as they travel now (``Counts.__reduce__``: the
  labels as the Arrow strings kept with them), and back;
- ``to_arrow``: converting a vocabulary's Python strings to Arrow (what pickling or uniting costs where the
  Arrow form was not kept);
- ``union_by_hash`` / ``union_by_sort``: ``_sorted_union_arrow`` of the two vocabularies' Arrow forms, with a
  hash pass (``repeats=True``) or by one sort of all labels (``repeats=False``, what ``_sorted_union`` does);
- ``sorted_union``: ``_sorted_union`` of the two as counts carry them (Arrow forms kept);
- ``dictionaries_by_hash`` / ``dictionaries_by_sort``: the same two ways, for the dictionaries of the first 8
  shards (as a run's vocabulary grows: they repeat labels).

::

    python bench/vocabulary_cost.py /tmp/corpus

writes bench/results/vocabulary-cost-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
from common import best, write_result

from pmi_pipeline import cooccurrence
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.shards import discover_shards, read_shard_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    paths = discover_shards([args.corpus])
    half = len(paths) // 2
    a = count_shards(paths[:half], None, check_repeats=False).counts
    b = count_shards(paths[half:], None, check_repeats=False).counts
    fresh = np.array(a.labels.tolist(), dtype=object)  # the same labels, with no Arrow form kept
    arrows = [cooccurrence._ARROW_LABELS.get(a.labels), cooccurrence._ARROW_LABELS.get(b.labels)]
    as_before = (a.labels, a.label_counts, a.pairs, a.n_examples, a.manifest)  # what Counts pickled before
    pickled_strings = pickle.dumps(as_before, protocol=5)
    pickled_counts = pickle.dumps(a, protocol=5)
    dictionaries = [read_shard_codes(p).dictionary.cast(pa.large_string()) for p in paths[:8]]
    union = {}
    steps = {
        "pickle_python_strings": lambda: pickle.dumps(as_before, protocol=5),
        "unpickle_python_strings": lambda: pickle.loads(pickled_strings),
        "pickle_counts": lambda: pickle.dumps(a, protocol=5),
        "unpickle_counts": lambda: pickle.loads(pickled_counts),
        "to_arrow": lambda: pa.array(fresh, pa.large_string()),
        "union_by_hash": lambda: union.setdefault("hash", cooccurrence._sorted_union_arrow(arrows, repeats=True)),
        "union_by_sort": lambda: union.setdefault("sort", cooccurrence._sorted_union_arrow(arrows, repeats=False)),
        "sorted_union": lambda: cooccurrence._sorted_union(a.labels, b.labels),
        "dictionaries_by_hash": lambda: cooccurrence._sorted_union_arrow(dictionaries, repeats=True),
        "dictionaries_by_sort": lambda: cooccurrence._sorted_union_arrow(dictionaries, repeats=False),
    }
    ms = {name: 1000 * best(args.repeat, fn)[0] for name, fn in steps.items()}
    if not union["hash"][0].equals(union["sort"][0]):
        raise AssertionError("the two ways of uniting gave different labels")
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "corpus": str(args.corpus),
        "labels": [int(a.n_labels), int(b.n_labels)],
        "union": len(union["sort"][0]),
        "ms": ms,
    }
    print(f"vocabularies of {a.n_labels:,} and {b.n_labels:,} labels, union {result['union']:,}:")
    for name, value in ms.items():
        print(f"  {name}: {value:.0f} ms")
    print(f"wrote {write_result('vocabulary-cost', result)}")


if __name__ == "__main__":
    main()
