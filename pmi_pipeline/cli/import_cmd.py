"""``pmi-pipeline import``: turn an XC or ARFF dataset into an import directory (Parquet shards)."""

from __future__ import annotations

import argparse
import json
from typing import Any

_EPILOG = """\
examples:
  pmi-pipeline import arff bibtex-train.arff bibtex-test.arff --xml bibtex.xml --out data/bibtex
  pmi-pipeline import arff Imdb.arff.bz2 --out data/imdb            # MEKA '-C 28'; random 80/20 split
  pmi-pipeline import xc eurlex_train.txt eurlex_test.txt --label-names label_names.txt --out data/eurlex
  pmi-pipeline import xc yeast_train.txt yeast_test.txt --out data/yeast   # header-less LIBSVM works too

The output directory holds dataset.json, labels.txt, annotations/{train,test}/ and features/{train,test}/
(Parquet; layout in docs/architecture.md). It is written in a temporary directory and renamed into place;
an existing non-empty directory is replaced only with --force.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="import an XC or ARFF dataset as annotation + feature shards",
        description="Import a multi-label dataset (Extreme Classification Repository text format, or\n"
        "Mulan/MEKA ARFF) into an import directory of Parquet annotation and feature shards with a\n"
        "train/test split.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="source_format", metavar="FORMAT", required=True)

    xc = formats.add_parser(
        "xc",
        help="Extreme Classification Repository text (header 'n d m', lines 'l1,l2 f:v f:v')",
        description="Import XC text files: a header 'n d m', then one line 'l1,l2 f:v f:v ...' per\n"
        "example (0-based indices; an example without labels starts with a space). Header-less\n"
        "LIBSVM multi-label files are accepted too (1-based features when no index 0 occurs).",
        epilog="example:\n  pmi-pipeline import xc bibtex_train.txt bibtex_test.txt "
        "--label-names label_names.txt --out data/bibtex-xc",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    xc.add_argument("--label-names", metavar="FILE", help="label names, one per line (default: the indices)")

    arff = formats.add_parser(
        "arff",
        help="Mulan or MEKA ARFF (sparse or dense rows; .gz/.bz2/.xz read directly)",
        description="Import ARFF files (sparse or dense rows). The labels are the attributes named in the\n"
        "Mulan label XML (--xml); without it, the MEKA relation name '@relation \"NAME: -C L\"' says\n"
        "that the first L (L > 0) or the last -L (L < 0) attributes are labels.",
        epilog="example:\n  pmi-pipeline import arff delicious-train.arff delicious-test.arff "
        "--xml delicious.xml --out data/delicious",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arff.add_argument("--xml", metavar="FILE", help="Mulan label XML naming the label attributes")

    for sub in (xc, arff):
        sub.add_argument("train", metavar="TRAIN", help="training file (or the whole dataset, without TEST)")
        sub.add_argument("test", metavar="TEST", nargs="?", help="test file (else TRAIN is split at random)")
        sub.add_argument("--out", required=True, metavar="DIR", help="import directory to write")
        sub.add_argument("--name", help="dataset name for dataset.json (default: from the file names)")
        sub.add_argument(
            "--test-fraction",
            type=float,
            default=0.2,
            metavar="F",
            help="test share of a random split, when no TEST is given (default: 0.2)",
        )
        sub.add_argument("--seed", type=int, default=0, help="seed of the random split (default: 0)")
        sub.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
        sub.add_argument("--json", action="store_true", help="print dataset.json instead of a summary")
        sub.set_defaults(func=run)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pmi_pipeline.importers import import_arff, import_xc

    common: dict[str, Any] = {
        "name": args.name,
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "force": args.force,
    }
    if args.source_format == "xc":
        info = import_xc(args.train, args.test, args.out, label_names=args.label_names, **common)
    else:
        info = import_arff(args.train, args.test, args.out, xml=args.xml, **common)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(summary(info, args.out))
    return 0


def summary(info: dict[str, Any], out: str) -> str:
    """A few lines a person reads: sizes per split and the label cardinality."""
    lines = [
        f"imported {info['name']} ({info['format']}) into {out}: "
        f"{info['n_labels']} labels, {info['n_features']} features"
    ]
    for split, s in info["splits"].items():
        per_example = s["n_annotations"] / s["n_examples"] if s["n_examples"] else 0.0
        lines.append(
            f"  {split:<5} {s['n_examples']:>8} examples  {s['n_annotations']:>9} annotations "
            f"({per_example:.3f} per example)  {s['n_without_labels']} without labels"
        )
    return "\n".join(lines)
