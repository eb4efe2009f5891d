"""What handing a count task's freed heap back to the OS after every batch costs, and why on this VM.

1. Re-faulting freed memory: a fresh 200 MB array is filled, freed, and filled again after a pause. On a VM whose
   balloon driver reports free pages to the host, memory freed for a second or more is the host's again, and
   faulting it back in costs far more than faulting pages the guest still holds.
2. ``count_batch`` on the first ``--batches`` batches of a corpus (as ``count_shards`` plans them for 2 workers),
   in a fresh process with the LocalCluster workers' malloc settings, with ``malloc_trim`` after every batch
   (what ``count_batch`` does up to 2,048 labels) and without it (what it does over more), alternated
   ``--rounds`` times: page faults (MiB), kernel and user CPU seconds, wall seconds::

    python bench/heap_trim.py /tmp/corpus          # a corpus written by `pmi-pipeline synth`, e.g. 10^5 labels

writes bench/results/heap-trim-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from common import refault_ms, write_result

from pmi_pipeline.dask_cluster import WORKER_MALLOC

CHILD = """
import json, os, resource, sys, time
from pmi_pipeline import cooccurrence
from pmi_pipeline.shards import discover_shards

corpus, n_batches, trim = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "trim"
paths = discover_shards([corpus])
batches = cooccurrence.plan_batches([os.path.getsize(p) for p in paths], 2)[:n_batches]
usage = lambda: resource.getrusage(resource.RUSAGE_SELF)
before, start = usage(), time.perf_counter()
for batch in batches:
    counts, _ = cooccurrence.count_batch([paths[i] for i in batch], run="heap-trim")
    if trim and not cooccurrence._pairs_in_histogram(counts.n_labels):
        cooccurrence._release_free_heap()  # count_batch already did where pairs go into a histogram
after = usage()
print(json.dumps({
    "wall_s": time.perf_counter() - start,
    "faulted_mib": (after.ru_minflt - before.ru_minflt) * resource.getpagesize() / 2**20,
    "sys_s": after.ru_stime - before.ru_stime,
    "user_s": after.ru_utime - before.ru_utime,
    "n_labels": counts.n_labels,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    refault = refault_ms([0, 0, 0.5, 2, 5])
    for row in refault:
        print(f"fresh 200 MB after a {row['pause_s']} s pause: {row['fill_ms']:.0f} ms")
    env = {**os.environ, **{k.rsplit(".", 1)[1]: str(v) for k, v in WORKER_MALLOC.items()}}
    runs: dict[str, list[dict[str, float]]] = {"trim": [], "no-trim": []}
    for _ in range(args.rounds):
        for mode in runs:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.corpus), str(args.batches), mode],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(result)
            print(
                f"{mode}: wall {result['wall_s']:.2f} s, faulted {result['faulted_mib']:.0f} MiB, "
                f"sys {result['sys_s']:.2f} s, user {result['user_s']:.2f} s ({result['n_labels']} labels)"
            )
    write_result(
        "heap-trim",
        {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "corpus": str(args.corpus),
            "batches": args.batches,
            "worker_malloc": {k.rsplit(".", 1)[1]: v for k, v in WORKER_MALLOC.items()},
            "refault": refault,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
