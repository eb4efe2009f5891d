"""Learning-curve plots (matplotlib, Agg backend: no display needed).

:func:`plot_learning_curves` draws one panel per metric and one line per run against the training step; with a
``cosine`` and a ``bce`` run it is the seed paper's Figure 1 (metric vs iterations for both heads). A history
is the list of dicts that :func:`pmi_pipeline.train.fit` records (``history.json`` in a run directory).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

__all__ = ["convergence_step", "load_history", "plot_learning_curves"]

DEFAULT_METRICS = ("P@1", "P@5", "PSP@5")
_COLORS = {"cosine": "tab:blue", "bce": "tab:orange"}


def load_history(run_dir: str | Path) -> list[dict[str, float]]:
    """The learning curve stored in ``RUN/history.json``."""
    return json.loads((Path(run_dir) / "history.json").read_text())


def convergence_step(history: Sequence[Mapping[str, float]], target: float, metric: str = "P@1") -> int | None:
    """First recorded step at which ``metric`` reaches ``target`` (None if it never does)."""
    for row in history:
        if row.get(metric, float("-inf")) >= target:
            return int(row["step"])
    return None


def plot_learning_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    out_path: str | Path,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    x: str = "step",
    title: str | None = None,
    reference: Mapping[str, float] | None = None,
) -> Path:
    """One panel per metric, one line per run (``histories``: name -> history); writes a PNG, returns it.

    ``reference``: optional horizontal lines, e.g. ``{"SLEEC P@1": 65.08}``; a key's metric is the text after
    its last space, and the line is drawn in the panel of that metric.
    """
    available = [m for m in metrics if any(m in row for h in histories.values() for row in h)]
    if not available:
        raise ValueError(f"none of the metrics {list(metrics)} is in the histories")
    ncols = 2 if len(available) == 4 else min(3, len(available))
    nrows = math.ceil(len(available) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(available) :]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, available, strict=False):
        for i, (name, history) in enumerate(histories.items()):
            pts = [(row[x], row[metric]) for row in history if metric in row and x in row]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            color = _COLORS.get(name.split()[0], f"C{i}")
            ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.5, label=name, color=color)
        for ref_name, value in (reference or {}).items():
            if ref_name.rsplit(" ", 1)[-1] == metric:
                ax.axhline(value, linestyle="--", linewidth=1, color="gray")
                ax.annotate(
                    ref_name,
                    (0.02, value),
                    xycoords=("axes fraction", "data"),
                    fontsize=8,
                    color="dimgray",
                    va="top",
                    xytext=(0, -2),
                    textcoords="offset points",
                )
        ax.set_xlabel("training step" if x == "step" else x)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
