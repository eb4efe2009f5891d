"""Peak RSS of each process while a 2-worker LocalCluster counts: this process (client and scheduler), each worker.

The process-tree peak of ``bench/embed.py`` does not say which process grows with the corpus; this does. For each
corpus size, ``count_shards`` runs once to warm up and once measured, while a thread samples every process's RSS
every 50 ms::

    python bench/process_memory.py --annotations 1e7 4e7 --labels 1000
    python bench/process_memory.py --corpus /tmp/c6 /tmp/c7 /tmp/c8     # corpora written by `pmi-pipeline synth`

writes bench/results/process-memory-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import write_result

import pmi_pipeline
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.dask_cluster import dask_client
from pmi_pipeline.shards import discover_shards
from pmi_pipeline.synth import SynthConfig, write_corpus


def measure(paths: list[Path]) -> dict:
    with dask_client(n_workers=2) as client:
        pids = {"client and scheduler": os.getpid()}
        pids.update({f"worker {i}": pid for i, pid in enumerate(client.run(os.getpid).values())})
        procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        count_shards(paths, client)  # warm-up: imports on the workers
        start_rss = {name: p.memory_info().rss for name, p in procs.items()}
        peak = dict(start_rss)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for name, p in procs.items():
                    peak[name] = max(peak[name], p.memory_info().rss)
                time.sleep(0.05)

        thread = threading.Thread(target=sample)
        thread.start()
        t0 = time.perf_counter()
        count_shards(paths, client)
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    return {
        "shards": len(paths),
        "seconds": seconds,
        "start_mib": {k: v / 2**20 for k, v in start_rss.items()},
        "peak_mib": {k: v / 2**20 for k, v in peak.items()},
    }


def _annotations(corpus: Path) -> int:
    return int(json.loads((corpus / "corpus.json").read_text())["n_annotations"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=float, nargs="+", default=[1e7, 4e7])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument(
        "--corpus", type=Path, nargs="+", help="corpora written by `pmi-pipeline synth` to measure instead"
    )
    args = parser.parse_args()
    rows = []
    for corpus in args.corpus or []:
        paths = discover_shards([corpus])
        rows.append({"corpus": str(corpus), "annotations": _annotations(corpus), **measure(paths)})
    for n in [] if args.corpus else args.annotations:
        with tempfile.TemporaryDirectory(prefix="pmi-process-memory-") as tmp:
            write_corpus(tmp, SynthConfig(n_annotations=int(n), n_labels=args.labels), progress=False)
            rows.append({"annotations": int(n), **measure(discover_shards([tmp]))})
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "library": str(Path(pmi_pipeline.__file__).parent),  # which checkout was measured
        "rows": rows,
    }
    names = list(rows[0]["peak_mib"])
    print("| annotations | seconds | " + " | ".join(f"{n}: peak MiB" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
        peaks = " | ".join(f"{r['peak_mib'][n]:.0f}" for n in names)
        print(f"| {r['annotations']:.0e} | {r['seconds']:.1f} | {peaks} |")
    out = write_result("process-memory", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
