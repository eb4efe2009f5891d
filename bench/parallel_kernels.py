"""How far 2 processes at once get on this machine, with no Dask: the ceiling for 2 workers against 1.

Each process counts the same number of consecutive shards with ``count_batch`` (5 shards per call), once alone
and then two at once (different shards); throughput of the pair against one process alone, best of
``--repeat``::

    python bench/parallel_kernels.py /tmp/corpus --shards 100

writes bench/results/parallel-kernels-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from common import sort_dispatch, write_result

CHILD = """
import sys, time
from pmi_pipeline.cooccurrence import count_batch
from pmi_pipeline.shards import discover_shards
paths = discover_shards([sys.argv[1]])
first, n = int(sys.argv[2]), int(sys.argv[3])
count_batch(paths[first : first + 5])  # imports and first-touch costs out of the timing
start = time.perf_counter()
for s in range(first, first + n, 5):
    count_batch(paths[s : s + 5])
print(time.perf_counter() - start)
"""


def run(corpus: Path, starts: list[int], n: int) -> list[float]:
    """Seconds of each process, all started together."""
    # from the corpus folder: `python -c` puts the working directory ahead of PYTHONPATH on sys.path
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(corpus.resolve()), str(s), str(n)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=corpus.resolve(),
            env={**os.environ, **sort_dispatch().sort_environ()},  # numpy's dispatch as the command sets it
        )
        for s in starts
    ]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--shards", type=int, default=100, help="shards per process")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    alone, together = [], []
    for _ in range(args.repeat):  # interleaved, so that both see the same load
        alone.append(run(args.corpus, [0], args.shards)[0])
        together.append(max(run(args.corpus, [0, args.shards], args.shards)))
    ratio = 2 * min(alone) / min(together)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "cores": os.cpu_count(),
        "corpus": str(args.corpus),
        "shards_per_process": args.shards,
        "alone_s": alone,
        "two_at_once_s": together,
        "throughput_two_vs_one": ratio,
    }
    out = write_result("parallel-kernels", result)
    print(f"alone {min(alone):.2f} s; two at once {min(together):.2f} s (slower of the two): {ratio:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
