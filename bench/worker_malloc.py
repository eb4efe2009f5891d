"""Counting under the glibc malloc settings of a Dask worker, in-process, to isolate their cost.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``; setting it also fixes glibc's mmap threshold
at 128 KiB, so every large numpy temporary becomes a fresh, page-faulted mmap. ``dask_cluster.WORKER_MALLOC``
adds ``MALLOC_MMAP_THRESHOLD_=33554432``. Each setting counts the same corpus in a fresh process, in interleaved
rounds (best of ``--repeat``), and the ratios are against the process with glibc's defaults::

    python bench/worker_malloc.py --annotations 1e7 --labels 100000

writes bench/results/malloc-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile

from common import write_result

SETTINGS = {
    "glibc defaults (in-process)": {},
    "Dask worker default (MALLOC_TRIM_THRESHOLD_=65536)": {"MALLOC_TRIM_THRESHOLD_": "65536"},
    "Dask worker + WORKER_MALLOC (MALLOC_MMAP_THRESHOLD_=32 MiB)": {
        "MALLOC_TRIM_THRESHOLD_": "65536",
        "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    },
}
CHILD = """
import json, resource, sys, time
from pmi_pipeline.cooccurrence import count_shards
from pmi_pipeline.shards import discover_shards
paths = discover_shards([sys.argv[1]])
start = time.perf_counter()
counts = count_shards(paths).counts
print(json.dumps({"seconds": time.perf_counter() - start, "pairs": counts.n_pairs,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=float, default=1e7)
    parser.add_argument("--labels", type=int, default=100000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from pmi_pipeline.synth import SynthConfig, write_corpus

    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="pmi-malloc-") as tmp:
        write_corpus(tmp, SynthConfig(n_annotations=int(args.annotations), n_labels=args.labels), progress=False)
        for _ in range(args.repeat):
            for name, env in SETTINGS.items():
                base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, tmp],
                    env={**base, **env},
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=tmp,  # `python -c` puts the working directory ahead of PYTHONPATH on sys.path
                )
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    reference = best["glibc defaults (in-process)"]
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "args": vars(args),
        "runs": runs,
        "best_s": best,
        "slowdown_vs_defaults": {name: s / reference for name, s in best.items()},
    }
    assert len({r["pairs"] for rs in runs.values() for r in rs}) == 1, "settings counted different pairs"
    print("| setting | best s | vs glibc defaults | peak MiB |\n|---|---|---|---|")
    for name, rs in runs.items():
        peak = max(r["peak_mib"] for r in rs)
        print(f"| {name} | {best[name]:.2f} | {best[name] / reference:.2f}x | {peak:.0f} |")
    out = write_result("malloc", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
