"""``mobilenet reproduce``: the papers' controlled comparisons re-run on CIFAR-10, resumable (docs/reproduce.md)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="re-run the papers' trade-offs (V1 Tables 4-7, V2 vs V1) on CIFAR-10, with plots (resumable)",
        description=(
            "Train every model of the chosen experiments with one fixed recipe, each as its own resumable run under "
            "OUT/<run>/, and write OUT/results.md, OUT/results.json and the plots. Run the same command again to "
            "continue after an interruption; finished runs are never retrained."
        ),
    )
    parser.add_argument(
        "--experiments",
        default="table4,v1-vs-v2,table6,table5,table7",
        help="comma-separated, trained in this order: table4, v1-vs-v2, table6, table5, table7, table8 (MobileNet "
        "vs VGG 16: the VGG run costs more than the other ten together), or all (default: all but table8)",
    )
    parser.add_argument(
        "--budget",
        default="quick",
        help="quick (about 2 hours on 2 CPU cores), gpu (one GPU, batch 512, 2 seeds; see benchmarks/gpu_reproduce.py) "
        "or full (60 epochs, for a GPU); default quick",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="cifar10, a CIFAR-10 ImageFolder directory (train/ + test/), or an image pack (.pack)",
    )
    parser.add_argument("--out", required=True, help="directory of the runs and the report")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the finished runs and train nothing"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mobilenet.reproduce import ReproduceConfig, run_reproduce

    result = run_reproduce(
        ReproduceConfig(data=args.data, out=args.out, experiments=args.experiments, budget=args.budget),
        progress=args.progress,
        report_only=args.report_only,
    )
    if args.report_only:
        print(f"{len(result.reused)} finished, {len(result.pending)} pending; report: {result.files['markdown']}")
    return 130 if result.interrupted else 0
