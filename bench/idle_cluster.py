"""What an idle 2-worker LocalCluster costs in CPU: the scheduler's process (with the client and the nannies) and
each worker, over ``--seconds`` with nothing to do, with Dask's own intervals for its periodic checks and with
ours (``dask_cluster.QUIET_EVENT_LOOPS``). Every other setting is ``dask_client``'s. Each setting runs in a fresh
process, taking turns ``--rounds`` times::

    python bench/idle_cluster.py --rounds 3

prints the share of a core each process used, and writes bench/results/idle-cluster-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import host_speed, write_result

CHILD = """
import json, os, sys, time
import psutil
from pmi_pipeline import dask_cluster

if __name__ == "__main__":
    if sys.argv[1] == "dask":
        dask_cluster.QUIET_EVENT_LOOPS = {}
    with dask_cluster.dask_client(n_workers=2) as client:
        client.wait_for_workers(2)
        time.sleep(2)  # the workers' start-up done
        me = psutil.Process()
        workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
        def cpu():
            return [sum(p.cpu_times()[:2]) for p in [me, *workers]]
        before, start = cpu(), time.perf_counter()
        time.sleep(float(sys.argv[2]))
        after, elapsed = cpu(), time.perf_counter() - start
    shares = [(b - a) / elapsed for a, b in zip(before, after)]
    print(json.dumps({"scheduler": shares[0], "workers": shares[1:]}))
"""


def _run(script: Path, setting: str, seconds: float) -> dict:
    out = subprocess.run(
        [sys.executable, str(script), setting, str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        cwd=script.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="idle seconds measured per run")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"dask": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "idle.py"  # a file, so that worker processes can import __main__
        script.write_text(CHILD)
        for r in range(args.rounds):
            for setting in runs:
                run = _run(script, setting, args.seconds)
                runs[setting].append(run)
                print(
                    f"round {r + 1}, {setting}: scheduler {run['scheduler']:.3f}, workers "
                    + ", ".join(f"{w:.3f}" for w in run["workers"])
                    + " of a core"
                )
    total = {s: statistics.median(x["scheduler"] + sum(x["workers"]) for x in rs) for s, rs in runs.items()}
    for setting, share in total.items():
        print(f"{setting}: {share:.3f} of a core in all (median)")
    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": host_speed(),
        "seconds": args.seconds,
        "runs": runs,
        "median_total_core_share": total,
    }
    print(f"wrote {write_result('idle-cluster', out)}")


if __name__ == "__main__":
    main()
