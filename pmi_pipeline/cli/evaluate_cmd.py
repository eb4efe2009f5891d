"""``pmi-pipeline evaluate RUN``: re-evaluate a run's checkpoint on the test split it was trained for."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="metrics of a trained run on its test split",
        description=(
            "Load RUN/checkpoint.pt, read the store version it was trained on and the test split of its "
            "data, and print P@k, nDCG@k, PSP@k (k = 1, 3, 5), MAP@100 and the class-weighted MAP@100, as "
            "percentages. Test rows without labels are kept unless --remove-invalid."
        ),
    )
    p.add_argument("run_dir", metavar="RUN", help="run directory written by `pmi-pipeline train`")
    p.add_argument("--json", action="store_true", help='one JSON object keyed like "P@1", "nDCG@3", "PSP@5"')
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data", help="evaluate on this import directory's test split instead of the recorded one")
    p.add_argument("--remove-invalid", action="store_true", default=None, help="drop test rows without labels")
    p.add_argument("--psp-a", type=float, help="propensity A (default: the run's, 0.55)")
    p.add_argument("--psp-b", type=float, help="propensity B (default: the run's, 1.5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pmi_pipeline.train import evaluate_run

    metrics = evaluate_run(
        args.run_dir,
        device=args.device,
        remove_invalid=args.remove_invalid,
        psp_a=args.psp_a,
        psp_b=args.psp_b,
        data=args.data,
    )
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    else:
        for key, value in metrics.items():
            print(f"{key:>10}  {value:6.2f}")
    return 0
