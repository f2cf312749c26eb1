"""``mobilenet models [PATTERN]``: the registered model names (the MobileNets, then the V1 paper's baselines)."""

from __future__ import annotations

import argparse

from mobilenet.errors import MobileNetError
from mobilenet.spec import list_models, model_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the registered model names")
    parser.add_argument("pattern", nargs="?", default="", help="substring or glob, e.g. 'mobilenet_v2_*_224'")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern, baselines=True)
    if not names:
        raise MobileNetError(f"no registered model matches {args.pattern!r}; `mobilenet models` lists them all")
    for name in names:
        config = model_config(name)
        print(f"{name:32s} {config.family}  alpha={config.alpha:<5g} resolution={config.resolution} {config.variant}")
    return 0
