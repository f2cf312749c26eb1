"""``mobilenet models [PATTERN]``: the registered model names (the MobileNets, then the V1 paper's baselines)."""

from __future__ import annotations

import argparse

from mobilenet.errors import MobileNetError
from mobilenet.spec import list_models, model_config, published_sources


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list the registered model names and who publishes ImageNet weights for them"
    )
    parser.add_argument("pattern", nargs="?", default="", help="substring or glob, e.g. 'mobilenet_v2_*_224'")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    names = list_models(args.pattern, baselines=True)
    if not names:
        raise MobileNetError(f"no registered model matches {args.pattern!r}; `mobilenet models` lists them all")
    print(f"{'name':32s} {'family':6s} {'alpha':6s} {'size':5s} {'variant':10s} ImageNet weights published by")
    for name in names:
        config = model_config(name)
        weights = ", ".join(published_sources(config)) or "-"
        print(
            f"{name:32s} {config.family:6s} {config.alpha:<6g} {config.resolution:<5d} {config.variant:10s} {weights}"
        )
    return 0
