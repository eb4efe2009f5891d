"""The label lookup of a count task, in milliseconds per shard, on a corpus's first ``--shards`` shards:

- ``index_in``: one ``pc.index_in`` per shard (``cooccurrence._Vocabulary.find``);
- ``index_in_together``: one for the labels of ``WAITING_SHARDS`` shards at once (``_Vocabulary.locate``, what a
  task does over more than ``LOOKUP_ALONE_LABELS`` labels);
- ``index_in_one_label``: ``index_in`` of a single label, which is the cost of hashing the vocabulary that every
  call pays;
- ``search_sorted``: a binary search of the shard's sorted dictionary in the sorted vocabulary
  (``pc.search_sorted``, then a check that the labels found are equal).

::

    python bench/label_lookup.py /tmp/corpus --shards 60

writes bench/results/label-lookup-<time>.json with the milliseconds per shard of each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from common import write_result

from pmi_pipeline import cooccurrence
from pmi_pipeline.shards import discover_shards, read_shard_codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--shards", type=int, default=60)
    args = parser.parse_args()
    dictionaries = [read_shard_codes(p).dictionary for p in discover_shards([args.corpus])[: args.shards]]
    vocabulary = cooccurrence._Vocabulary()
    vocabulary.locate(dictionaries)  # every label met: each lookup finds all its labels
    labels, arrow = vocabulary.labels, pa.array(vocabulary.labels, pa.large_string())

    def searched(dictionary: pa.Array) -> np.ndarray:
        needles = dictionary.cast(pa.large_string())
        at = pc.search_sorted(arrow, needles)
        if not pc.all(pc.equal(arrow.take(at), needles)).as_py():
            raise AssertionError("a label was not found")
        return at.to_numpy().astype(np.int64)

    def together(dictionaries: list[pa.Array]) -> list[np.ndarray]:
        found, step = [], cooccurrence.WAITING_SHARDS
        for at in range(0, len(dictionaries), step):
            found.extend(vocabulary.locate(dictionaries[at : at + step])[1])
        return found

    seconds = {}
    for name, lookup in (
        ("index_in", lambda ds: [vocabulary.find(d)[1] for d in ds]),
        ("index_in_together", together),
        ("search_sorted", lambda ds: [searched(d) for d in ds]),
    ):
        start = time.perf_counter()
        found = lookup(dictionaries)
        seconds[name] = (time.perf_counter() - start) / len(dictionaries)
        for positions, dictionary in zip(found, dictionaries, strict=True):  # all found the labels themselves
            assert np.array_equal(labels[positions], dictionary.to_numpy(zero_copy_only=False))
    start = time.perf_counter()
    for dictionary in dictionaries:
        vocabulary.find(dictionary[:1])
    seconds["index_in_one_label"] = (time.perf_counter() - start) / len(dictionaries)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "corpus": str(args.corpus),
        "n_shards": len(dictionaries),
        "labels_per_shard": float(np.mean([len(d) for d in dictionaries])),
        "vocabulary": int(labels.size),
        "ms_per_shard": {name: 1000 * s for name, s in seconds.items()},
    }
    print(
        f"{result['labels_per_shard']:,.0f} labels a shard, {labels.size:,} in the vocabulary: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in result["ms_per_shard"].items())
        + " per shard"
    )
    print(f"wrote {write_result('label-lookup', result)}")


if __name__ == "__main__":
    main()
