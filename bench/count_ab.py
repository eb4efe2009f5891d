"""Two libraries counting the same corpus on a LocalCluster, in interleaved rounds: on a shared, noisy machine
a before/after comparison is only fair when both run in the same minutes.

Each round runs each library in a fresh process (a new cluster, a warm-up count, then ``--runs`` timed counts of
the whole corpus). The other library is any checkout's ``pmi_pipeline`` folder's parent, e.g. one made with
``git archive <commit> pmi_pipeline | tar x -C /tmp/before``::

    python bench/count_ab.py /tmp/before /tmp/corpus --workers 2 --rounds 3

``--workers 0`` counts in the child process itself, without Dask.

writes bench/results/count-ab-<time>.json and prints every time and each library's median.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import sort_dispatch, write_result

CHILD = """
import contextlib, json, sys, time
import pmi_pipeline
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.dask_cluster import dask_client
from pmi_pipeline.shards import discover_shards

if __name__ == "__main__":
    paths = discover_shards([sys.argv[1]])
    workers = int(sys.argv[2])
    with dask_client(n_workers=workers) if workers else contextlib.nullcontext() as client:
        count_shards(paths[:8], client)  # warm-up: imports on the workers
        times = []
        for _ in range(int(sys.argv[3])):
            start = time.perf_counter()
            count_shards(paths, client)
            times.append(time.perf_counter() - start)
    print(json.dumps({"library": pmi_pipeline.__file__, "times": times}))
"""


def run(library: Path | None, corpus: Path, workers: int, runs: int) -> dict:
    # Both libraries with numpy's dispatch as the pmi-pipeline command sets it (AVX2 sort on AMD Zen 4), in the
    # child and its workers: what differs is the library.
    env = {**os.environ, **sort_dispatch().sort_environ()}
    env.pop("PYTHONPATH", None)
    if library is not None:
        env["PYTHONPATH"] = str(library)
    script = corpus.parent / f".count-ab-{os.getpid()}.py"  # a file, so that worker processes can import __main__
    script.write_text(CHILD)
    try:
        out = subprocess.run(
            [sys.executable, str(script), str(corpus), str(workers), str(runs)],
            capture_output=True,
            text=True,
            check=True,
            cwd=corpus.parent,  # not this checkout: the working directory comes first on sys.path
            env=env,
        )
    finally:
        script.unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="folder that holds the other library's pmi_pipeline package")
    parser.add_argument("corpus", type=Path, help="a corpus written by `pmi-pipeline synth`")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers; 0 counts in one process, without Dask")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="timed counts per library and round")
    args = parser.parse_args()
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for library in (args.other, None):  # the other library first, then this checkout's
            result = run(library, args.corpus.resolve(), args.workers, args.runs)
            times.setdefault(str(Path(result["library"]).parent), []).extend(result["times"])
            print(f"round {r + 1}: {result['library']}: {', '.join(f'{t:.2f}' for t in result['times'])} s")
    medians = {lib: statistics.median(ts) for lib, ts in times.items()}
    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "corpus": str(args.corpus),
        "workers": args.workers,
        "times_s": times,
        "median_s": medians,
    }
    for lib, median in medians.items():
        print(f"median {median:.2f} s: {lib}")
    print(f"wrote {write_result('count-ab', out)}")


if __name__ == "__main__":
    main()
