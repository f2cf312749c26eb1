"""``mobilenet demo``: the V1 paper's Table 4 in miniature (separable vs standard conv) on built-in digits."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train separable vs standard-conv MobileNet on built-in digits and compare (about a minute)"
    )
    parser.add_argument("--out", default="runs/demo", help="where the runs and the plot go")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs of each of the two models")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and the initial weights")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mobilenet.demo import DemoConfig, run_demo
    from mobilenet.errors import MobileNetError

    if args.epochs < 1:
        raise MobileNetError(f"--epochs must be an integer >= 1, got {args.epochs}")
    run_demo(DemoConfig(out=args.out, epochs=args.epochs, seed=args.seed), progress=args.progress)
    return 0
