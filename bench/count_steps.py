"""Where a count's time goes, step by step, in one process: the count of a corpus's first ``--shards`` shards
(``count_shards`` without Dask, the same count tasks and merges a worker runs), with the library's step functions
timed while it runs. Each step's time is its own (what it calls that is itself a step is counted there), so the
steps add up::

    python bench/count_steps.py /tmp/corpus --shards 120

prints seconds, milliseconds per shard and shares, and writes bench/results/count-steps-<time>.json. Run it
with ``PYTHONPATH`` set to another checkout to time that one's library (the file records which was timed).
numpy's CPU dispatch is set as the ``pmi-pipeline`` command sets it (``sort_dispatch.use_fast_sort``: its AVX2
sort on AMD Zen 4), whichever library is timed; ``NPY_DISABLE_CPU_FEATURES=`` (empty) keeps numpy's default.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

from common import StepClock, host_speed, sort_dispatch, write_result

sort_dispatch().use_fast_sort()  # before numpy is imported

from pmi_pipeline import cooccurrence  # noqa: E402
from pmi_pipeline.cooccurrence import count_shards  # noqa: E402
from pmi_pipeline.shards import discover_shards  # noqa: E402

#: (where the function is looked up, its name, the step it is counted in)
STEPS = [
    (cooccurrence, "read_shard_codes", "read and validate a shard"),
    (cooccurrence._Vocabulary, "lookup", "look labels up in the run's vocabulary"),
    (cooccurrence._Vocabulary, "_grow", "grow the vocabulary"),
    (cooccurrence, "distinct_pairs", "sort (example, label) codes"),
    (cooccurrence.PairCounter, "add", "enumerate pair keys"),
    (cooccurrence._KeyCounter, "_flush", "sort and count keys"),
    (cooccurrence, "_keys_to_csr", "build CSR parts"),
    (cooccurrence._KeyCounter, "result", "add a batch's CSR parts"),
    (cooccurrence, "_merge_pair", "merge batches' counts"),
    (cooccurrence, "_sorted_union", "unite the vocabularies of counts"),
    (cooccurrence, "_remap_monotone", "move counts to a larger vocabulary"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--shards", type=int, default=120)
    args = parser.parse_args()
    paths = discover_shards([args.corpus])[: args.shards]
    count_shards(paths[:4], None, check_repeats=False)  # imports and first calls
    with StepClock().timing(STEPS) as clock:
        start = time.perf_counter()
        result = count_shards(paths, None, check_repeats=False)
        wall = time.perf_counter() - start
    steps = dict(clock.seconds)
    steps["the rest"] = wall - sum(steps.values())
    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "host_speed": host_speed(),
        "library": str(Path(cooccurrence.__file__).parent),
        "numpy_environ": os.environ.get("NPY_DISABLE_CPU_FEATURES"),
        "corpus": str(args.corpus),
        "n_shards": len(paths),
        "n_labels": result.counts.n_labels,
        "n_annotations": result.counts.n_annotations,
        "wall_s": wall,
        "steps_s": steps,
    }
    print(
        f"{len(paths)} shards, {out['n_annotations']:,} annotations over {out['n_labels']:,} labels: {wall:.2f} s "
        f"in one process (host {out['host_speed']})"
    )
    print("| step | seconds | ms per shard | share |\n|---|---:|---:|---:|")
    for step, seconds in sorted(steps.items(), key=lambda item: -item[1]):
        print(f"| {step} | {seconds:.2f} | {1000 * seconds / len(paths):.1f} | {seconds / wall:.0%} |")
    print(f"wrote {write_result('count-steps', out)}")


if __name__ == "__main__":
    main()
