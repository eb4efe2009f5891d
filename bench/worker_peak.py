"""What a Dask worker holds at its peak RSS during a 2-worker count: Python and numpy allocations (tracemalloc,
the largest by where they were made), Arrow's allocated bytes, and glibc's heap (``mallinfo2``: in use, and free
but kept). A thread on each worker samples every 30 ms and takes a snapshot each time the RSS reaches a new high,
so the count runs slower than it otherwise would; only the breakdown is the result::

    python bench/worker_peak.py /tmp/corpus          # a corpus written by `pmi-pipeline synth`

writes bench/results/worker-peak-<time>.json and prints each worker's breakdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from common import write_result

import pmi_pipeline
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.dask_cluster import dask_client
from pmi_pipeline.shards import discover_shards


def _start(interval: float = 0.03) -> None:
    """On a worker: trace allocations, and snapshot them at each new high of the RSS."""
    import builtins
    import ctypes
    import threading
    import time
    import tracemalloc

    import psutil
    import pyarrow as pa

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        ]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    state = builtins._pmi_worker_peak = {"rss": 0, "stop": False}  # a module global would be pickled by value
    tracemalloc.start(8)

    def sample() -> None:
        process = psutil.Process()
        while not state["stop"]:
            rss = process.memory_info().rss
            if rss > state["rss"]:
                info = libc.mallinfo2()
                state.update(
                    rss=rss,
                    snapshot=tracemalloc.take_snapshot(),
                    traced=tracemalloc.get_traced_memory()[0],
                    arrow=pa.default_memory_pool().bytes_allocated(),
                    heap=info.arena,
                    heap_in_use=info.uordblks,
                    heap_free=info.fordblks,
                )
            time.sleep(interval)

    threading.Thread(target=sample, daemon=True).start()


def _report(top: int = 8) -> dict:
    """On a worker: the breakdown at its peak, in MiB."""
    import builtins
    import tracemalloc

    state = builtins._pmi_worker_peak
    state["stop"] = True
    mib = 2**20
    largest = [
        {
            "mib": stat.size / mib,
            "blocks": stat.count,
            "where": " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in list(stat.traceback)[-4:]),
        }
        for stat in state["snapshot"].statistics("traceback")[:top]
    ]
    tracemalloc.stop()
    return {
        "rss_mib": state["rss"] / mib,
        "traced_mib": state["traced"] / mib,
        "arrow_mib": state["arrow"] / mib,
        "heap_mib": state["heap"] / mib,
        "heap_in_use_mib": state["heap_in_use"] / mib,
        "heap_free_mib": state["heap_free"] / mib,
        "largest": largest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("needs glibc (mallinfo2)")
    paths = discover_shards([args.corpus])
    with dask_client(n_workers=2) as client:
        client.wait_for_workers(2)
        client.run(_start)
        count_shards(paths, client)
        workers = client.run(_report)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "library": str(Path(pmi_pipeline.__file__).parent),
        "corpus": str(args.corpus),
        "workers": workers,
    }
    for address, w in workers.items():
        print(
            f"{address}: peak RSS {w['rss_mib']:.0f} MiB; traced {w['traced_mib']:.1f}, Arrow {w['arrow_mib']:.1f}, "
            f"heap {w['heap_mib']:.1f} ({w['heap_in_use_mib']:.1f} in use, {w['heap_free_mib']:.1f} free)"
        )
        for part in w["largest"]:
            print(f"  {part['mib']:6.1f} MiB in {part['blocks']:5d} blocks: {part['where']}")
    print(f"wrote {write_result('worker-peak', result)}")


if __name__ == "__main__":
    main()
