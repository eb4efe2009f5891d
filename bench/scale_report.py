"""How cost grows: tables and PNG plots of time and peak memory against annotations and against labels.

Reads result files written by ``bench/embed.py run`` (any number, e.g. one sweep over corpus sizes at fixed
labels and one run per label count at fixed annotations), takes every measured (annotations, labels) point, and
writes two figures, ``docs/img/scale-annotations.png`` (x: annotations, one line per label count) and
``docs/img/scale-labels.png`` (x: labels, one line per annotation count), plus a Markdown table on stdout::

    python bench/scale_report.py bench/results/embed-A.json bench/results/embed-B.json

No new measurement happens here: every figure is one that ``bench/embed.py`` measured and stored.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PHASES = {  # phase -> legend
    "count": "count, ours (Dask, 2 workers)",
    "inmem-count": "count, in-memory seed (Y.T @ Y)",
    "embed": "embed end to end, ours (Dask)",
}
MiB = 2**20


def load_points(paths: list[Path]) -> list[dict[str, Any]]:
    """One row per (annotations, labels, phase) that finished; a later file replaces an earlier one's point."""
    rows: dict[tuple[int, int, str], dict[str, Any]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        labels = int(data["args"]["labels"])
        for size in data["sizes"]:
            phases = size["phases"]
            count = phases.get("count", {})
            for phase, report in phases.items():
                if phase not in PHASES or report.get("returncode") != 0:
                    continue
                rows[int(size["n_annotations_requested"]), labels, phase] = {
                    "file": path.name,
                    "annotations": int(size["n_annotations_requested"]),
                    "labels": labels,
                    "phase": phase,
                    "seconds": float(report["time_s"]),
                    "peak_rss_mib": report["peak_rss_bytes"] / MiB,
                    "largest_process_mib": report.get("peak_single_process_rss_bytes", 0) / MiB,
                    "pairs": count.get("n_pairs"),
                    "stages": report.get("stage_timings", {}),
                    "dim": data["args"].get("dim"),
                }
    return list(rows.values())


def _exp(n: float) -> str:
    e = math.log10(n)
    return f"10^{e:.0f}" if abs(e - round(e)) < 1e-9 else f"{n:,.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| annotations | labels | phase | seconds | peak RSS MiB (tree) | largest process MiB | distinct pairs "
        "| stages (s) | results file |",
        "|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["labels"], r["annotations"], list(PHASES).index(r["phase"]))):
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in r["stages"].items())
        pairs = f"{r['pairs']:,}" if r["pairs"] else ""
        lines.append(
            f"| {_exp(r['annotations'])} | {_exp(r['labels'])} | {PHASES[r['phase']]} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r['largest_process_mib']:.0f} | {pairs} | {stages} | {r['file']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], x: str, group: str, out: Path) -> None:
    """Two panels (seconds, peak RSS) against ``x``, one line per (phase, ``group`` value) with 2+ points."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4))
    lines: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault((r["phase"], r[group]), []).append(r)
    styles = {"count": "-o", "inmem-count": "--s", "embed": ":^"}
    for (phase, value), points in sorted(lines.items(), key=lambda kv: (kv[0][1], list(PHASES).index(kv[0][0]))):
        if len(points) < 2:
            continue
        points.sort(key=lambda r: r[x])
        xs = [r[x] for r in points]
        label = f"{PHASES[phase]}, {_exp(value)} {group}"
        axes[0].plot(xs, [r["seconds"] for r in points], styles[phase], label=label)
        axes[1].plot(xs, [r["peak_rss_mib"] for r in points], styles[phase], label=label)
    for ax, ylabel in zip(axes, ("seconds", "peak RSS of the process tree (MiB)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)
    fig.suptitle(f"Cost against {x} (bench/embed.py on 2 cores, 24 GiB)")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench/embed.py result files")
    parser.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    parser.add_argument("--name", default="scale", help="figure file names: NAME-annotations.png, NAME-labels.png")
    args = parser.parse_args()
    rows = load_points(args.results)
    print(table(rows))
    by_annotations, by_labels = args.img_dir / f"{args.name}-annotations.png", args.img_dir / f"{args.name}-labels.png"
    plot(rows, "annotations", "labels", by_annotations)
    plot(rows, "labels", "annotations", by_labels)
    print(f"\nwrote {by_annotations} and {by_labels}")


if __name__ == "__main__":
    main()
