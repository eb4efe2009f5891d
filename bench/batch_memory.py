"""Working memory of one count task: ``count_batch`` on 1, 4 and 8 shards, each in a fresh process.

Reports the peak RSS above the process's RSS just before the call (imports done, one shard read to warm up), which
is what a worker adds while it counts a batch, and, from a second call under ``tracemalloc``, the peak of what
numpy and Python hold allocated at once (the RSS also carries what the heap keeps after frees). Workers run with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=33554432 ARROW_DEFAULT_MEMORY_POOL=system``
(pmi_pipeline.dask_cluster); set them to measure as a worker would. Run it against another checkout to compare
versions::

    python bench/batch_memory.py --labels 1000
    PYTHONPATH=/path/to/older/checkout python bench/batch_memory.py --labels 1000

writes bench/results/batch-memory-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result

CHILD = """
import json, resource, sys, time, tracemalloc
import psutil
import pmi_pipeline
from pmi_pipeline.cooccurrence import count_batch
from pmi_pipeline.shards import discover_shards, read_annotations
paths = discover_shards([sys.argv[1]])[: int(sys.argv[2])]
read_annotations(paths[0])
before = psutil.Process().memory_info().rss
start = time.perf_counter()
counts, _ = count_batch(paths)
seconds, added = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
n_annotations = counts.n_annotations
del counts
tracemalloc.start()  # a second run, for the peak of what numpy and Python allocate at once (not what the heap keeps)
count_batch(paths)
print(json.dumps({"shards": len(paths), "annotations": n_annotations, "seconds": seconds, "added_mib": added / 2**20,
                  "traced_peak_mib": tracemalloc.get_traced_memory()[1] / 2**20, "library": pmi_pipeline.__file__}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    from pmi_pipeline.synth import SynthConfig, write_corpus

    rows = []
    with tempfile.TemporaryDirectory(prefix="pmi-batch-memory-") as tmp:
        config = SynthConfig(n_examples=50_000 * max(args.shards), n_labels=args.labels, shard_size=50_000)
        write_corpus(tmp, config, progress=False)
        for n in args.shards:
            # run from the corpus folder: `python -c` puts the working directory first on sys.path, ahead of
            # PYTHONPATH, and the library of the current directory would be measured instead of the one asked for
            out = subprocess.run(
                [sys.executable, "-c", CHILD, tmp, str(n)], capture_output=True, text=True, check=True, cwd=tmp
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "library": str(Path(rows[0]["library"]).parent),  # as the measured processes loaded it
        "args": vars(args),
        "rows": rows,
    }
    print(
        f"library: {result['library']}\n"
        "| shards | annotations | seconds | MiB added (RSS) | MiB allocated at once (tracemalloc) |\n"
        "|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['shards']} | {r['annotations']:,} | {r['seconds']:.2f} | {r['added_mib']:.0f} | "
            f"{r['traced_peak_mib']:.0f} |"
        )
    out = write_result("batch-memory", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
