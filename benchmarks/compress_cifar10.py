"""The SVD-factored classifier on a trained CIFAR-10 checkpoint: top-1 and parameters at several ranks, before and
after a short fine-tune (the table and the plot of docs/compress.md).

    python benchmarks/compress_cifar10.py RUN/best.safetensors [--ranks 10,8,6,4,2,1] [--fine-tune-batches 100]

Top-1 is measured on CIFAR-10's 10,000 test images (``--data``, default ``../shared/data/cifar10`` beside the
checkout) with ``mobilenet.compress.compress_checkpoint``, the code path of ``mobilenet compress``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from mobilenet.checkpoint import load_checkpoint
from mobilenet.compress import compress_checkpoint
from mobilenet.cost import count_costs
from mobilenet.io import atomic_write_text
from mobilenet.plots import plot_rank_sweep

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trained CIFAR-10 checkpoint (e.g. from benchmarks/train_cifar10.py)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 ImageFolder tree (train/, test/)")
    parser.add_argument("--ranks", default="10,8,6,4,2,1", help="classifier ranks to try (default 10,8,6,4,2,1)")
    parser.add_argument("--fine-tune-batches", type=int, default=100, help="batches of 64 in the short fine-tune")
    parser.add_argument("--out", default="docs", help="where compress_cifar10.json/.md and the plot go")
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.checkpoint)
    full = count_costs(checkpoint.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in (int(r) for r in args.ranks.split(",")):
            report = compress_checkpoint(
                args.checkpoint,
                rank,
                Path(tmp) / f"rank{rank}.safetensors",
                data=args.data,
                fine_tune_epochs=1,
                limit_train_batches=args.fine_tune_batches,
                log=None,
            )
            row = {"rank": rank, **report.to_dict()}
            rows.append(row)
            print(json.dumps(row))
    document = {
        "checkpoint": str(args.checkpoint),
        "model": checkpoint.name,
        "params_full": full.params,
        "classifier_params_full": full.rows[-1].params,
        "fine_tune_batches": args.fine_tune_batches,
        "rows": rows,
    }
    out = Path(args.out)
    atomic_write_text(out / "compress_cifar10.json", json.dumps(document, indent=2) + "\n")
    plot_rank_sweep(rows, out / "img" / "compress_cifar10.png", title=f"{checkpoint.name} on CIFAR-10")
    print(f"wrote {out / 'compress_cifar10.json'} and {out / 'img' / 'compress_cifar10.png'}")


if __name__ == "__main__":
    main()
