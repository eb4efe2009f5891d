"""Where the processes of a 2-worker count spend their time, by sampling their Python stacks with py-spy (not a
dependency: ``pip install py-spy``): the client (with the scheduler and the nannies) and each worker.

The count runs ``--counts`` times on a fresh LocalCluster, all under ``py-spy record --subprocesses``. Each
sample is put down to the innermost function of ``pmi_pipeline`` on its stack (``-`` where there is none: Dask's
own work, or waiting) and to the function it was in; the shares are of each process's samples, the first count
(imports, the workers' first allocations) included::

    python bench/worker_profile.py /tmp/corpus --counts 2

writes the shares to bench/results/worker-profile-<time>.json (``--raw FILE`` keeps py-spy's samples too).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result

CHILD = """
import sys, time
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.dask_cluster import dask_client
from pmi_pipeline.shards import discover_shards

if __name__ == "__main__":
    paths = discover_shards([sys.argv[1]])
    with dask_client(n_workers=2) as client:
        client.wait_for_workers(2)
        for i in range(int(sys.argv[2])):
            start = time.perf_counter()
            count_shards(paths, client)
            print(f"count {i + 1}: {time.perf_counter() - start:.2f} s", flush=True)
"""


def shares(raw: Path, top: int) -> dict[str, dict[str, object]]:
    """Per process: its samples, and the ``top`` (library function, innermost function) pairs by share."""
    by_process: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        last = max(i for i, frame in enumerate(frames) if frame.startswith("process "))
        process, inner = frames[last].split(":")[0], frames[last + 1 :]
        ours = [frame for frame in inner if "pmi_pipeline/" in frame]
        where = (ours[-1] if ours else "-") + " <- " + (inner[-1] if inner else "-")
        by_process[process][where] += int(n)
    out = {}
    for process, counter in sorted(by_process.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(counter.values())
        out[process] = {
            "samples": total,
            "top": [{"where": where, "share": round(n / total, 4)} for where, n in counter.most_common(top)],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--counts", type=int, default=2)
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--raw", type=Path, help="where to keep py-spy's raw samples")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw or Path(tmp) / "samples.txt"
        command = ["py-spy", "record", "--subprocesses", "--format", "raw", "-r", str(args.rate), "-o", str(raw)]
        subprocess.run([*command, "--", sys.executable, "-c", CHILD, str(args.corpus), str(args.counts)], check=True)
        processes = shares(raw, args.top)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "corpus": str(args.corpus),
        "counts": args.counts,
        "rate": args.rate,
        "processes": processes,
    }
    for process, entry in result["processes"].items():
        print(f"{process}: {entry['samples']} samples")
        for row in entry["top"][:10]:
            print(f"  {100 * row['share']:5.1f}%  {row['where'][:150]}")
    print(f"wrote {write_result('worker-profile', result)}")


if __name__ == "__main__":
    main()
