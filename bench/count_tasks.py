"""Where a 2-worker count's time goes, from Dask's task stream: compute seconds per worker and task kind, seconds
spent moving task inputs between workers, CPU seconds per process, and how long the run went on after its last
count task (the merges and the transfer of the result that cannot run in parallel), with each task span of that
tail, and how long each batch's counts waited on their worker before the client's merges could take them. Then
the same corpus is counted once in this process without Dask (``count_shards(paths, None)``), with the seconds
inside its count tasks and its merges, for the same work done by one process alone: what the workers
compute beyond that is what running side by side costs them.

    python bench/count_tasks.py /tmp/corpus          # a corpus written by `pmi-pipeline synth`

writes bench/results/count-tasks-<time>.json. Run it with ``PYTHONPATH`` set to another checkout to measure that
one's library on the same corpus (the file records which library was measured).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import time
from pathlib import Path

import psutil
from common import StepClock, host_speed, sort_dispatch, write_result

sort_dispatch().use_fast_sort()  # as the pmi-pipeline command does, before numpy is imported

from distributed import get_task_stream  # noqa: E402

import pmi_pipeline  # noqa: E402
from pmi_pipeline import cooccurrence  # noqa: E402
from pmi_pipeline.cooccurrence import count_shards  # noqa: E402
from pmi_pipeline.dask_cluster import dask_client  # noqa: E402
from pmi_pipeline.shards import discover_shards  # noqa: E402


def in_process(paths: list[Path]) -> dict[str, float]:
    """One count without Dask, timing what its count tasks and merges take (the functions wrapped meanwhile)."""
    steps = [(cooccurrence, "count_batch", "count_batch_s"), (cooccurrence, "_merge_pair", "merges_s")]
    with StepClock().timing(steps) as clock:
        start = time.perf_counter()
        count_shards(paths, None, check_repeats=False)
        wall = time.perf_counter() - start
    return {"wall_s": wall, **{step: clock.seconds[step] for _, _, step in steps}}


def waits_for_counts(spans: list[tuple[float, float, str, str, str]]) -> dict[str, dict[str, float]]:
    """Per worker, how long a batch's counts waited after its count task before ``_first`` took them: the merges
    that fold them into the worker's sum are submitted by the client only then. A ``_first`` is matched to the
    worker's first count task before it that has none yet, in order; ``behind_next_count`` counts the batches
    whose ``_first`` ran only after the worker's next count task had started."""
    out = {}
    for worker in sorted({w for *_, w in spans}):
        mine = sorted((a, b, kind) for a, b, action, kind, w in spans if w == worker and action == "compute")
        counts = [(a, b) for a, b, kind in mine if kind == "count-batch"]
        firsts = [a for a, _, kind in mine if kind == "_first"]
        waits, behind = [], 0
        for (_, stop), first in zip(counts, firsts, strict=False):
            waits.append(first - stop)
            behind += any(stop <= a < first for a, _ in counts)
        if waits:
            out[worker] = {
                "batches": len(counts),
                "median_wait_s": round(sorted(waits)[len(waits) // 2], 3),
                "max_wait_s": round(max(waits), 3),
                "behind_next_count": behind,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    paths = discover_shards([args.corpus])
    with dask_client(n_workers=args.workers) as client:
        count_shards(paths[:8], client)  # warm-up: imports on the workers
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        cpu_before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        start = time.time()
        with get_task_stream(client) as stream:
            result = count_shards(paths, client)
        wall = time.time() - start
        cpu = {p.pid: sum(p.cpu_times()[:2]) - cpu_before[p.pid] for p in procs}
    alone = in_process(paths)
    compute: dict[str, float] = collections.defaultdict(float)
    moving: dict[str, float] = collections.defaultdict(float)
    n_tasks: collections.Counter[str] = collections.Counter()
    last_count = start
    spans = []
    for task in stream.data:
        kind = "count-batch" if task["key"].startswith("count-batch") else task["key"].split("-")[0]
        n_tasks[kind] += 1
        for span in task["startstops"]:
            spans.append((span["start"] - start, span["stop"] - start, span["action"], kind, task["worker"]))
            seconds = span["stop"] - span["start"]
            if span["action"] == "compute":
                compute[f"{task['worker']} {kind}"] += seconds
                if kind == "count-batch":
                    last_count = max(last_count, span["stop"])
            elif span["action"] == "transfer":
                moving[task["worker"]] += seconds
    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "host_speed": host_speed(),
        "library": str(Path(pmi_pipeline.__file__).parent),
        "corpus": str(args.corpus),
        "n_annotations": result.counts.n_annotations,
        "n_labels": result.counts.n_labels,
        "n_pairs": result.counts.n_pairs,
        "wall_s": wall,
        "after_last_count_s": start + wall - last_count,
        "cpu_s": {
            "this process (client, scheduler)": cpu[procs[0].pid],
            "workers": sum(cpu.values()) - cpu[procs[0].pid],
        },
        "compute_s": dict(sorted(compute.items())),
        "transfer_s": dict(sorted(moving.items())),
        "tasks": dict(n_tasks),
        "compute_all_workers_s": {
            kind: sum(v for k, v in compute.items() if k.endswith(f" {kind}"))
            for kind in ("count-batch", "_merge_pair", "_merge_tile")
        },
        "in_process": alone,
        "waits_for_counts": waits_for_counts(spans),
        # what ran after the last count task, seconds from the start: the last merges and the moves between workers;
        # from the last one's end to wall_s, the result travels to this process
        "tail": [
            {"start_s": round(a, 3), "stop_s": round(b, 3), "action": action, "task": kind, "worker": worker}
            for a, b, action, kind, worker in sorted(spans)
            if b > last_count - start
        ],
    }
    path = write_result("count-tasks", out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("date",)}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
