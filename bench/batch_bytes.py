"""Time and peak memory of a 2-worker count against the Parquet bytes per count task (``batch_bytes``).

Smaller batches hold fewer annotations in a count task at once, but cost more tasks and more merges. For each
corpus and batch size, a fresh process starts a 2-worker LocalCluster (``dask_client``), counts the corpus once
(no warm-up: as ``bench/embed.py``'s count phase), while this process samples the RSS of every process of its
tree every 20 ms::

    python bench/batch_bytes.py /tmp/c6 /tmp/c7 /tmp/c8 --batch-bytes 1 1048576 4194304

(``1``: one shard per task; corpora written by ``pmi-pipeline synth``) writes bench/results/batch-bytes-<time>.json
with, per run, the seconds, the peak of the tree's summed RSS and each process's own peak (MiB).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from common import TreeMonitor, write_result

CHILD = """
import json, sys, time
import pmi_pipeline
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.dask_cluster import dask_client
from pmi_pipeline.shards import discover_shards

if __name__ == "__main__":
    corpus, batch_bytes = sys.argv[1], int(sys.argv[2])
    paths = discover_shards([corpus])
    with dask_client(n_workers=2) as client:
        client.wait_for_workers(2)
        start = time.perf_counter()
        result = count_shards(paths, client, batch_bytes=batch_bytes)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "n_annotations": result.counts.n_annotations,
                      "n_pairs": result.counts.n_pairs, "library": pmi_pipeline.__file__}))
"""


def measure(corpus: Path, batch_bytes: int) -> dict:
    """One count in a fresh process, its process tree sampled every 20 ms (:class:`common.TreeMonitor`)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(corpus), str(batch_bytes)], stdout=subprocess.PIPE, text=True
    )
    with TreeMonitor(proc.pid, interval=0.02) as monitor:
        out, _ = proc.communicate()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, out)
    return {
        **json.loads(out.strip().splitlines()[-1]),
        "tree_peak_mib": monitor.result.peak_rss / 2**20,
        "process_peaks_mib": sorted(v / 2**20 for v in monitor.result.peak_by_pid.values()),
        "at_tree_peak_mib": sorted(
            ([monitor.result.roles.get(pid, "?"), rss / 2**20] for pid, rss in monitor.result.at_peak.items()),
            key=lambda r: -r[1],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, nargs="+", help="corpora written by `pmi-pipeline synth`")
    parser.add_argument("--batch-bytes", type=int, nargs="+", default=[1, 1 << 20, 4 << 20])
    args = parser.parse_args()
    rows = []
    for corpus in args.corpus:
        for batch_bytes in args.batch_bytes:
            row = {"corpus": str(corpus), "batch_bytes": batch_bytes, **measure(corpus, batch_bytes)}
            rows.append(row)
            print(
                f"| {corpus} | {batch_bytes} | {row['seconds']:.2f} | {row['tree_peak_mib']:.0f} | "
                f"{', '.join(f'{p:.0f}' for p in row['process_peaks_mib'])} |",
                flush=True,
            )
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "load_average": os.getloadavg(), "rows": rows}
    print(f"wrote {write_result('batch-bytes', result)}")


if __name__ == "__main__":
    main()
