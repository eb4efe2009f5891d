"""Build the sample data in ``data/`` from the shared copies of the public datasets.

    python scripts/make_sample_data.py --shared ../shared/data

writes, through the project's own importers (so ``data/`` is also an end-to-end check of them):

- ``data/bibtex/``: Mulan bibtex (ARFF + label XML), its fixed train/test split, as an import directory;
- ``data/delicious/``: Mulan delicious, likewise;
- ``data/eurlex/``: the EUR-Lex EUROVOC label sets (labels only, no features), as list-form annotation shards
  ``annotations/part-0000{0..3}.parquet`` with ``example_id`` = record number (0-based line of labelsets.tsv),
  plus ``labels.txt`` (the descriptors in order of first occurrence).

The output is deterministic (no timestamps), so re-running it leaves ``data/`` unchanged.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pmi_pipeline.importers import import_arff  # noqa: E402

EURLEX_SHARDS = 4


def build_mulan(shared: Path, out: Path, name: str) -> dict:
    src = shared / name
    return import_arff(
        src / f"{name}-train.arff",
        src / f"{name}-test.arff",
        out / name,
        xml=src / f"{name}.xml",
        name=name,
        force=True,
    )


def build_eurlex(shared: Path, out: Path, n_shards: int = EURLEX_SHARDS) -> dict:
    """Split labelsets.tsv (one record per line, labels tab-separated) into contiguous list-form shards."""
    path = shared / "eurlex_eurovoc_labels" / "labelsets.tsv"
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    label_sets = [list(dict.fromkeys(x for x in line.split("\t") if x)) for line in lines]
    if any(not s for s in label_sets):
        raise SystemExit(f"{path}: a record without labels")
    vocabulary = list(dict.fromkeys(x for s in label_sets for x in s))

    target = out / "eurlex"
    ann = target / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    for old in ann.glob("*.parquet"):
        old.unlink()
    bounds = np.linspace(0, len(label_sets), n_shards + 1).round().astype(int)
    for k in range(n_shards):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        table = pa.table(
            {
                "example_id": pa.array(np.arange(lo, hi, dtype=np.int64)),
                "labels": pa.array(label_sets[lo:hi], pa.list_(pa.string())),
            }
        )
        pq.write_table(table, ann / f"part-{k:05d}.parquet", compression="zstd")
    (target / "labels.txt").write_text("".join(f"{x}\n" for x in vocabulary), encoding="utf-8")
    n_ann = sum(len(s) for s in label_sets)
    return {
        "name": "eurlex",
        "n_examples": len(label_sets),
        "n_labels": len(vocabulary),
        "n_annotations": n_ann,
    }


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, required=True, help="the shared data directory (../shared/data)")
    parser.add_argument("--out", type=Path, default=REPO / "data", help="output directory (default: data/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("bibtex", "delicious"):
        info = build_mulan(args.shared, args.out, name)
        total = sum(s["n_examples"] for s in info["splits"].values())
        ann = sum(s["n_annotations"] for s in info["splits"].values())
        n_train, n_test = (info["splits"][k]["n_examples"] for k in ("train", "test"))
        print(
            f"{name}: {n_train}/{n_test} examples, "
            f"{info['n_labels']} labels, {info['n_features']} features, cardinality {ann / total:.3f}, "
            f"{du(args.out / name) / 1e6:.2f} MB"
        )
    eur = build_eurlex(args.shared, args.out)
    print(
        f"eurlex: {eur['n_examples']} label sets, {eur['n_labels']} labels, cardinality "
        f"{eur['n_annotations'] / eur['n_examples']:.3f}, {du(args.out / 'eurlex') / 1e6:.2f} MB"
    )
    print(f"total: {du(args.out) / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
