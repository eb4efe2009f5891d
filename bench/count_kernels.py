"""Before and after, in one process: the counting kernels of the fourth scale pass (issue 5).

The "before" code is the library as it was at ``--before`` (default ``28e2114``, the last commit before the
pass), loaded from git into this process next to the current one, so both run on the same input, in the same
process, one after the other:

1. Reading and validating a shard (``shards.read_annotations``): labels hashed, validated and sorted once per
   annotation (before) against read as Parquet dictionaries and handled once per distinct label (after).
2. Counting a batch's pairs (``cooccurrence.upper_pair_counts``): per-pair index arithmetic by first-label blocks,
   keys sorted (before), against whole columns per example size, keys counted by a histogram where the labels
   are few (after). Both on the same 8-shard batch.
3. The repeat check over 400 shards' example-id fingerprints (``example_ids.find_repeats``): one file per shard
   opened for every range read (before) against one file read by ``pread``, ranges on threads (after).

Each pair checks that both give the same result and reports the best of ``--repeat``::

    python bench/count_kernels.py --labels 1000 100000

writes bench/results/count-kernels-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from common import best, write_result

from pmi_pipeline import cooccurrence, example_ids, shards
from pmi_pipeline.shards import discover_shards
from pmi_pipeline.synth import SynthConfig, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def load_before(commit: str, module: str, into: Path) -> ModuleType:
    """``pmi_pipeline.<module>`` as it was at ``commit``, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:pmi_pipeline/{module}.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = into / f"before_{module}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"before_{module}", path)
    assert spec and spec.loader
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up
    spec.loader.exec_module(loaded)
    return loaded


def batch_codes(anns: list[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """A batch's codes as ``counts_from_batch`` builds them, over the union of the shards' vocabularies."""
    labels, positions = cooccurrence._sorted_union_many([a.labels for a in anns])
    offsets = np.cumsum([0, *(a.n_examples for a in anns)])
    example_codes = np.concatenate([a.example_codes + o for a, o in zip(anns, offsets[:-1], strict=True)])
    label_codes = np.concatenate([p[a.label_codes] for a, p in zip(anns, positions, strict=True)])
    return example_codes.astype(np.int32), label_codes.astype(np.int32), labels.size


def compare_kernels(before: dict[str, ModuleType], n_labels: int, shards_n: int, repeat: int, tmp: Path) -> dict:
    corpus = tmp / f"corpus-{n_labels}"
    config = SynthConfig(n_examples=50_000 * shards_n, n_labels=n_labels, shard_size=50_000, seed=0)
    write_corpus(corpus, config, progress=False)
    paths = discover_shards([corpus])

    def read_all(module: ModuleType) -> Callable[[], list[Any]]:
        return lambda: [module.read_annotations(p) for p in paths]

    t_read_before, anns_before = best(repeat, read_all(before["shards"]))
    t_read_after, anns_after = best(repeat, read_all(shards))
    same_read = all(
        np.array_equal(np.asarray(a.labels, object), np.asarray(b.labels.to_pylist(), object))
        and np.array_equal(a.example_codes, b.example_codes)
        and np.array_equal(a.label_codes, b.label_codes)
        and np.array_equal(a.example_ids, b.example_ids)
        for a, b in zip(anns_before, anns_after, strict=True)
    )

    example_codes, label_codes, m = batch_codes(anns_after)
    t_pairs_before, p_before = best(
        repeat, lambda: before["cooccurrence"].upper_pair_counts(example_codes, label_codes, m)
    )
    t_pairs_after, p_after = best(repeat, lambda: cooccurrence.upper_pair_counts(example_codes, label_codes, m))
    return {
        "labels": n_labels,
        "shards": shards_n,
        "annotations": int(example_codes.size),
        "distinct_pairs": int(p_after.nnz),
        "read_s": {"before": t_read_before, "after": t_read_after, "speedup": t_read_before / t_read_after},
        "read_same_result": bool(same_read),
        "pairs_s": {"before": t_pairs_before, "after": t_pairs_after, "speedup": t_pairs_before / t_pairs_after},
        "pairs_same_result": bool((p_before != p_after).nnz == 0),
    }


def compare_repeat_check(before: ModuleType, n_shards: int, per_shard: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    parts = [(f"shard-{i}", np.unique(rng.integers(0, 2**64 - 1, per_shard, dtype=np.uint64))) for i in range(n_shards)]
    parts.append(("repeats-shard-3", parts[3][1][:10].copy()))  # one real repeat, so both must find it
    results = {}
    for name, module in (("before", before), ("after", example_ids)):
        files = module.FingerprintFiles()
        for key, hashes in parts:
            files.add(key, hashes)
        elapsed, found = best(repeat, lambda m=module, f=files: m.find_repeats(m.ExampleIndex.empty(), f))
        results[name] = (elapsed, [(r.shard, r.other, r.n_repeated) for r in found])
    return {
        "shards": n_shards,
        "fingerprints": n_shards * per_shard,
        "before_s": results["before"][0],
        "after_s": results["after"][0],
        "speedup": results["before"][0] / results["after"][0],
        "same_result": results["before"][1] == results["after"][1],
        "repeats_found": results["after"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--shards", type=int, default=8, help="shards of 50,000 examples in the batch (default 8)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", default="28e2114", help="commit of the code to compare against")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    report: dict[str, Any] = {
        "bench": "count_kernels",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "before": args.before,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "kernels": [],
    }
    with tempfile.TemporaryDirectory(prefix="count-kernels-") as tmp:
        before = {name: load_before(args.before, name, Path(tmp)) for name in ("shards", "cooccurrence", "example_ids")}
        for n_labels in args.labels:
            row = compare_kernels(before, n_labels, args.shards, args.repeat, Path(tmp))
            report["kernels"].append(row)
            print(
                f"{n_labels:>7} labels, {row['annotations']:,} annotations in {row['shards']} shards: "
                f"read {row['read_s']['before']:.3f} -> {row['read_s']['after']:.3f} s "
                f"({row['read_s']['speedup']:.2f}x, same: {row['read_same_result']}); "
                f"pairs {row['pairs_s']['before']:.3f} -> {row['pairs_s']['after']:.3f} s "
                f"({row['pairs_s']['speedup']:.2f}x, same: {row['pairs_same_result']})"
            )
        check = compare_repeat_check(before["example_ids"], 400, 50_000, args.repeat)
        report["repeat_check"] = check
        print(
            f"repeat check, {check['fingerprints']:,} fingerprints in {check['shards']} shards: "
            f"{check['before_s']:.3f} -> {check['after_s']:.3f} s "
            f"({check['speedup']:.2f}x, same: {check['same_result']})"
        )
    report["load_average_after"] = os.getloadavg()
    out = write_result("count-kernels", report, args.results_dir)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
