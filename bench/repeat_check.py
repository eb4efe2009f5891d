"""What the repeat check of a count (``find_repeats``: example ids seen in two shards) costs, and ways of doing it
that were not kept:

- 2-worker counts of a corpus in interleaved rounds on one LocalCluster: with the check as it is (a thread per
  core), with it on one thread, and without it (``check_repeats=False``), medians;
- ``find_repeats`` alone, on the fingerprint files of that corpus;
- per element, on ``--fingerprints`` random fingerprints in ``--runs`` sorted runs (as the shards' parts of one
  range): numpy's default sort, its stable sort (timsort, which merges runs), and Arrow's hash passes
  (``pc.unique``, ``pc.count_distinct``)::

    python bench/repeat_check.py /tmp/corpus --rounds 4

writes bench/results/repeat-check-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from common import host_speed, write_result

from pmi_pipeline import example_ids
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.dask_cluster import dask_client
from pmi_pipeline.example_ids import ExampleIndex, find_repeats
from pmi_pipeline.shards import discover_shards


class _OneThread(ThreadPoolExecutor):
    def __init__(self, max_workers: int | None = None) -> None:
        super().__init__(max_workers=1)


def counts(paths: list[Path], rounds: int) -> dict[str, list[float]]:
    """Seconds of each way of counting, taking turns ``rounds`` times after a warm-up."""
    ways = {"check": (True, ThreadPoolExecutor), "check on one thread": (True, _OneThread), "no check": (False, None)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    with dask_client(n_workers=2) as client:
        count_shards(paths[:8], client)  # warm-up: imports on the workers
        try:
            for _ in range(rounds):
                for way, (check, pool) in ways.items():
                    example_ids.ThreadPoolExecutor = pool or ThreadPoolExecutor
                    start = time.perf_counter()
                    count_shards(paths, client, check_repeats=check)
                    seconds[way].append(time.perf_counter() - start)
        finally:
            example_ids.ThreadPoolExecutor = ThreadPoolExecutor
    return seconds


def check_alone(paths: list[Path], repeat: int) -> dict[str, object]:
    """``find_repeats`` on a count's fingerprint files, in this process with nothing else running."""
    files = count_shards(paths, None, check_repeats=False).example_ids
    order = list(files)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        find_repeats(ExampleIndex.empty(), files, order=order)
        seconds.append(time.perf_counter() - start)
    return {"fingerprints": files.n_fingerprints, "seconds": seconds}


def per_element(n: int, runs: int, repeat: int) -> dict[str, float]:
    """Best nanoseconds per element of each way of finding repeated fingerprints."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**63, n, dtype=np.uint64)
    in_runs = np.concatenate([np.sort(part) for part in np.array_split(values, runs)])
    ways = {
        "np.sort": lambda: np.sort(in_runs),
        "np.sort(kind='stable')": lambda: np.sort(in_runs, kind="stable"),
        "pc.unique": lambda: pc.unique(pa.array(in_runs)),
        "pc.count_distinct": lambda: pc.count_distinct(pa.array(in_runs)),
    }
    best = {}
    for way, fn in ways.items():
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best[way] = min(times) / n * 1e9
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="a corpus written by `pmi-pipeline synth`")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--fingerprints", type=int, default=1 << 20)
    parser.add_argument("--runs", type=int, default=400)
    args = parser.parse_args()
    paths = discover_shards([args.corpus])
    seconds = counts(paths, args.rounds)
    for way, times in seconds.items():
        print(f"count, {way}: median {statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})")
    alone = check_alone(paths, 3)
    alone_s = ", ".join(f"{t:.3f}" for t in alone["seconds"])
    print(f"find_repeats alone, {alone['fingerprints']:,} fingerprints: {alone_s} s")
    ns = per_element(args.fingerprints, args.runs, 7)
    print(", ".join(f"{way} {v:.1f} ns" for way, v in ns.items()) + " per element")
    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": host_speed(),
        "corpus": str(args.corpus),
        "count_seconds": seconds,
        "count_median_s": {way: statistics.median(times) for way, times in seconds.items()},
        "find_repeats_alone": alone,
        "ns_per_element": ns,
        "fingerprints": args.fingerprints,
        "runs": args.runs,
    }
    print(f"wrote {write_result('repeat-check', out)}")


if __name__ == "__main__":
    main()
