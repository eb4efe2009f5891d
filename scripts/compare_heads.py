"""Train the cosine head and the BCE head with identical settings and compare them (the paper's Figure 1).

Both heads get the same store version (its vocabulary is the label space of both), encoder, optimizer,
schedule, batch order, seed and number of epochs. With ``--lr-grid``, the learning rate of each head is chosen
from the same grid on a validation part of the training split (``--val-fraction``, never the test split); each
head is then retrained on the whole training split with its chosen rate and evaluated on the test split.

Writes ``OUT/cosine`` and ``OUT/bce`` (run directories, as ``pmi-pipeline train`` writes them),
``OUT/comparison.json``, ``OUT/comparison.md`` (a table beside the published anchors) and the learning-curve
plot (``--plot``, default ``OUT/heads.png``). The convergence step is the first evaluated step at which the
cosine head's test P@1 reaches the BCE head's final test P@1.

Usage::

    python scripts/compare_heads.py --store stores/bibtex.zarr --data data/bibtex --out runs/bibtex \\
        --epochs 10 --lr-grid 0.003,0.01,0.03 --plot docs/img/bibtex_heads.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmi_pipeline.plots import convergence_step, plot_learning_curves
from pmi_pipeline.train import TrainConfig, fit, load_inputs

# Published numbers (docs: /work/shared/anchors.md; the Extreme Classification Repository's tables).
ANCHORS: dict[str, dict[str, dict[str, float]]] = {
    "bibtex": {
        "1-vs-All": {
            "P@1": 62.62,
            "P@3": 39.09,
            "P@5": 28.79,
            "PSP@1": 48.84,
            "PSP@3": 52.96,
            "PSP@5": 59.29,
        },
        "LEML": {"P@1": 62.54, "P@3": 38.41, "P@5": 28.21, "PSP@1": 47.97, "PSP@3": 51.42, "PSP@5": 57.53},
        "SLEEC": {"P@1": 65.08, "P@3": 39.64, "P@5": 28.87, "PSP@1": 51.12, "PSP@3": 53.95, "PSP@5": 59.56},
        "Parabel": {"P@1": 64.53, "P@3": 38.56, "P@5": 27.94, "PSP@1": 50.88, "PSP@3": 52.42, "PSP@5": 57.36},
        "PfastreXML": {
            "P@1": 63.46,
            "P@3": 39.22,
            "P@5": 29.14,
            "PSP@1": 52.28,
            "PSP@3": 54.36,
            "PSP@5": 60.55,
        },
    },
    "delicious": {
        "LEML": {"P@1": 65.67, "P@3": 60.55, "P@5": 56.08, "PSP@1": 30.73, "PSP@3": 32.43, "PSP@5": 33.26},
        "SLEEC": {"P@1": 67.59, "P@3": 61.38, "P@5": 56.56, "PSP@1": 32.11, "PSP@3": 33.21, "PSP@5": 33.83},
        "Parabel": {"P@1": 67.44, "P@3": 61.83, "P@5": 56.75, "PSP@1": 32.69, "PSP@3": 34.00, "PSP@5": 34.53},
        "FastXML": {"P@1": 69.61, "P@3": 64.12, "P@5": 59.27, "PSP@1": 32.35, "PSP@3": 34.51, "PSP@5": 35.43},
    },
}
COLUMNS = ("P@1", "P@3", "P@5", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5")

log = logging.getLogger("compare_heads")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _widths(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip() and x.strip() != "0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--store-version")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dataset", help="anchor table to print beside (default: the data directory's name)")
    p.add_argument("--plot", help="learning-curve PNG (default OUT/heads.png)")
    p.add_argument("--lr-grid", type=_floats, help="choose each head's learning rate from these on validation")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--evals-per-epoch", type=int, default=4, help="learning-curve points per epoch (final runs)")
    defaults = TrainConfig()
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr, help="used when no --lr-grid")
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--optimizer", default=defaults.optimizer)
    p.add_argument("--schedule", default=defaults.schedule)
    p.add_argument("--hidden", type=_widths, default=[])
    p.add_argument("--dropout", type=float, default=defaults.dropout)
    p.add_argument("--input-norm", default=defaults.input_norm)
    p.add_argument("--embedding-dims", type=int)
    p.add_argument("--cosine-loss", default=defaults.cosine_loss)
    p.add_argument("--temperature", type=float, default=defaults.temperature)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="auto")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _config(args: argparse.Namespace, head: str, lr: float) -> TrainConfig:
    return TrainConfig(
        head=head,
        store=args.store,
        store_version=args.store_version,
        data=args.data,
        hidden=args.hidden,
        dropout=args.dropout,
        input_norm=args.input_norm,
        embedding_dims=args.embedding_dims,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        cosine_loss=args.cosine_loss,
        temperature=args.temperature,
        seed=args.seed,
        device=args.device,
        eval_k=100,
    )


def _table(rows: dict[str, dict[str, float]], columns=COLUMNS) -> str:
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.2f}" if c in metrics else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or Path(args.data).resolve().name
    inputs = load_inputs(_config(args, "cosine", args.lr))

    selection: dict[str, dict[str, float]] = {"cosine": {}, "bce": {}}
    chosen = {"cosine": args.lr, "bce": args.lr}
    if args.lr_grid:
        for head in ("cosine", "bce"):
            for lr in args.lr_grid:
                cfg = dataclasses.replace(_config(args, head, lr), val_fraction=args.val_fraction, eval_k=5)
                res = fit(cfg, inputs, progress=False)
                selection[head][f"{lr:g}"] = res.metrics["P@1"]
                print(f"  selection {head} lr={lr:g}: validation P@1 {res.metrics['P@1']:.2f}", flush=True)
            chosen[head] = float(max(selection[head], key=lambda k: selection[head][k]))

    results = {}
    n_train_rows = inputs.Y_train.shape[0]
    eval_every = max(1, math.ceil(n_train_rows / args.batch_size / max(1, args.evals_per_epoch)))
    for head in ("cosine", "bce"):
        cfg = dataclasses.replace(_config(args, head, chosen[head]), eval_every=eval_every)
        results[head] = fit(cfg, inputs, out / head, progress=False)
        print(f"  {head} lr={chosen[head]:g}: test P@1 {results[head].metrics['P@1']:.2f}", flush=True)

    cos_hist, bce_hist = results["cosine"].history, results["bce"].history
    bce_final = results["bce"].metrics["P@1"]
    cos_final = results["cosine"].metrics["P@1"]
    conv = {
        "bce_final_P@1": bce_final,
        "cosine_step_reaching_bce_final_P@1": convergence_step(cos_hist, bce_final),
        "bce_step_reaching_cosine_final_P@1": convergence_step(bce_hist, cos_final),
        "total_steps": int(cos_hist[-1]["step"]),
    }
    anchors = ANCHORS.get(dataset, {})
    plot = plot_learning_curves(
        {f"cosine (lr {chosen['cosine']:g})": cos_hist, f"bce (lr {chosen['bce']:g})": bce_hist},
        args.plot or out / "heads.png",
        metrics=("P@1", "P@5", "PSP@1", "PSP@5"),
        title=f"{dataset}: cosine vs BCE head, test split",
        reference={f"SLEEC {m}": anchors["SLEEC"][m] for m in ("P@1", "P@5", "PSP@5")} if anchors else None,
    )
    summary = {
        "dataset": dataset,
        "store": inputs.store_path,
        "store_version": inputs.store_version,
        "k": int(inputs.embedding.shape[1] if args.embedding_dims is None else args.embedding_dims),
        "m": inputs.n_store_labels,
        "config": {head: results[head].config.to_dict() for head in results},
        "lr_selection": {"grid": args.lr_grid, "val_fraction": args.val_fraction, "val_P@1": selection}
        if args.lr_grid
        else None,
        "metrics": {head: results[head].metrics for head in results},
        "convergence": conv,
        "train_time_s": {head: results[head].history[-1]["train_time_s"] for head in results},
        "plot": str(plot),
        "command": " ".join(["python", "scripts/compare_heads.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = {f"cosine head (ours, lr {chosen['cosine']:g})": results["cosine"].metrics}
    rows[f"BCE head (ours, lr {chosen['bce']:g})"] = results["bce"].metrics
    rows.update({f"{name} (published)": vals for name, vals in anchors.items()})
    md = _table(rows)
    md += (
        f"\n\nconvergence: cosine reaches the BCE head's final P@1 ({bce_final:.2f}) at step "
        f"{conv['cosine_step_reaching_bce_final_P@1']} of {conv['total_steps']}\n"
    )
    (out / "comparison.md").write_text(md)
    print(md)
    return summary


if __name__ == "__main__":
    main()
