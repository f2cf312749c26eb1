"""The SVD-factored classifier on a trained CIFAR-10 checkpoint: top-1 and parameters at several ranks, before and
after a short fine-tune (the table and the plot of docs/compress.md).

    python benchmarks/compress_cifar10.py RUN/best.safetensors [--ranks 10,8,6,4,2,1] [--fine-tune-batches 100]

Top-1 is measured on CIFAR-10's 10,000 test images (``--data``, default ``../shared/data/cifar10`` beside the
checkout) with the steps of ``mobilenet compress`` (:func:`mobilenet.compress.factor_with_report`,
:func:`~mobilenet.compress.fine_tune`, :func:`~mobilenet.compress.validation_top1`), the data decoded once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mobilenet.checkpoint import load_checkpoint
from mobilenet.compress import FineTuneData, factor_with_report, fine_tune, validation_top1
from mobilenet.cost import count_costs
from mobilenet.data import Preprocessing, load_data
from mobilenet.io import atomic_write_text
from mobilenet.plots import plot_rank_sweep

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a trained CIFAR-10 checkpoint (e.g. from benchmarks/train_cifar10.py)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the CIFAR-10 ImageFolder tree (train/, test/)")
    parser.add_argument("--ranks", default="10,8,6,4,2,1", help="classifier ranks to try (default 10,8,6,4,2,1)")
    parser.add_argument("--fine-tune-batches", type=int, default=100, help="batches of 64 in the short fine-tune")
    parser.add_argument("--out", default="docs", help="where compress_cifar10.json and the plot go")
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.checkpoint)
    data = _open_once(args.data, checkpoint)  # decoded once, for every rank (compress_checkpoint opens it per call)
    device = torch.device("cpu")
    original = validation_top1(checkpoint.model, data, device)
    full = count_costs(checkpoint.config)
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        torch.manual_seed(0)
        factored, report = factor_with_report(checkpoint.model, rank)
        row = {
            "rank": rank,
            "factorisation": report.to_dict(),
            "params_after": count_costs(factored).params,
            "top1": {"original": original, "factored": validation_top1(factored, data, device)},
        }
        history = fine_tune(factored, data, epochs=1, device=device, limit_train_batches=args.fine_tune_batches)
        row["top1"]["fine_tuned"] = history[-1]["val_top1"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    document = {
        "checkpoint": str(args.checkpoint),
        "model": checkpoint.name,
        "params_full": full.params,
        "top1_original": original,
        "fine_tune_batches": args.fine_tune_batches,
        "rows": rows,
    }
    out = Path(args.out)
    atomic_write_text(out / "compress_cifar10.json", json.dumps(document, indent=2) + "\n")
    plot_rank_sweep(rows, out / "img" / "compress_cifar10.png", title=f"{checkpoint.name} on CIFAR-10")
    print(f"wrote {out / 'compress_cifar10.json'} and {out / 'img' / 'compress_cifar10.png'}")


def _open_once(source: str, checkpoint) -> FineTuneData:
    bundle = load_data(source, in_memory=True)
    prep = Preprocessing.from_dict(checkpoint.preprocessing)
    generator = torch.Generator().manual_seed(0)
    return FineTuneData(
        classes=list(bundle.classes),
        train=DataLoader(bundle.train_dataset(prep), batch_size=64, shuffle=True, drop_last=True, generator=generator),
        val=DataLoader(bundle.val_dataset(prep), batch_size=256),
        small_images=prep.style == "small",
    )


if __name__ == "__main__":
    main()
