"""Counting throughput: in-process vs a Dask LocalCluster of 1 and 2 workers, on one synthetic corpus.

Each configuration counts the same shards (best of ``--repeat``, workers warmed by a first pass) and must produce
counts equal to the in-process ones. Prints ratios against in-process counting and writes
bench/results/count-workers-<time>.json.

    python bench/count_workers.py --annotations 1e7 --labels 20000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

from common import best, host_speed, sort_dispatch, write_result

sort_dispatch().use_fast_sort()  # as the pmi-pipeline command does, before numpy is imported

import pmi_pipeline  # noqa: E402
from pmi_pipeline.cooccurrence import BATCH_BYTES, count_shards  # noqa: E402
from pmi_pipeline.dask_cluster import dask_client  # noqa: E402
from pmi_pipeline.shards import discover_shards  # noqa: E402
from pmi_pipeline.synth import SynthConfig, write_corpus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=float, default=1e7)
    parser.add_argument("--labels", type=int, default=20000)
    parser.add_argument("--shard-size", type=int, default=50000, help="examples per shard")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--corpus", type=Path, help="count this corpus (written by `pmi-pipeline synth`) instead of writing one"
    )
    parser.add_argument(
        "--batch-bytes", type=int, default=BATCH_BYTES, help="Parquet bytes per count task (1: one shard per task)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pmi-count-workers-") as tmp:
        if args.corpus:
            described = json.loads((args.corpus / "corpus.json").read_text())
            n_annotations, n_examples = described["n_annotations"], described["n_examples"]
            args.labels = described["config"]["n_labels"]
        else:
            config = SynthConfig(n_annotations=int(args.annotations), n_labels=args.labels, shard_size=args.shard_size)
            summary = write_corpus(Path(tmp) / "corpus", config, progress=False)
            n_annotations, n_examples = summary.n_annotations, summary.n_examples
        paths = discover_shards([args.corpus or Path(tmp) / "corpus"])
        serial_s, reference = best(args.repeat, lambda: count_shards(paths, batch_bytes=args.batch_bytes).counts)
        rows = [{"config": "in-process", "workers": 0, "seconds": serial_s}]
        for workers in (1, 2):
            with dask_client(n_workers=workers) as client:
                count_shards(paths, client)  # warm-up: imports on the workers
                seconds, counts = best(
                    args.repeat, lambda c=client: count_shards(paths, c, batch_bytes=args.batch_bytes).counts
                )
            assert counts.equals(reference), "Dask counts differ from in-process counts"
            rows.append({"config": f"Dask LocalCluster, {workers} worker(s)", "workers": workers, "seconds": seconds})
    for row in rows:
        row["annotations_per_s"] = n_annotations / row["seconds"]
        row["speedup_vs_in_process"] = serial_s / row["seconds"]
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "cores": os.cpu_count(),
        "host_speed": host_speed(),
        "library": str(Path(pmi_pipeline.__file__).parent),  # which checkout was measured
        "corpus": str(args.corpus) if args.corpus else None,
        "n_annotations": n_annotations,
        "n_examples": n_examples,
        "n_labels": args.labels,
        "n_shards": len(paths),
        "batch_bytes": args.batch_bytes,
        "n_pairs": reference.n_pairs,
        "rows": rows,
    }
    out = write_result("count-workers", result)
    print(
        f"{n_annotations:.3g} annotations, {len(paths)} shards, {args.labels} labels, "
        f"batches of up to {args.batch_bytes} bytes, "
        f"load average {result['load_average'][0]:.1f}, host {result['host_speed']}"
    )
    print("| configuration | seconds | annotations/s | vs in-process |\n|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['seconds']:.2f} | {row['annotations_per_s']:.3g} | "
            f"{row['speedup_vs_in_process']:.2f}x |"
        )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
