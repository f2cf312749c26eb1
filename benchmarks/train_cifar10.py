"""The CIFAR-10 recipes: train, then print test accuracy and wall time (the figures docs/training.md reports).

    python benchmarks/train_cifar10.py --recipe cpu   # 2 CPU cores, <= 60 min of training, target >= 85% test top-1
    python benchmarks/train_cifar10.py --recipe gpu   # one GPU, target >= 92% test top-1

Data: the real CIFAR-10 (``--data``, default ``../shared/data/cifar10`` as an ImageFolder of JPEGs, else
torchvision's download). Validation during training is the 10,000-image test split (CIFAR has no other), and the
final figure is re-measured from the saved checkpoint with ``mobilenet eval``'s code path.

Why these recipes:
- cpu: MobileNet V1 at width 0.5 with ``small_input`` (stride 8, so a 32x32 image ends on a 4x4 map, not 1x1):
  45M multiply-adds per image: 16 epochs in 53 minutes of training on 2 idle cores (about 255 training images/s
  at batch 128, channels_last; measured 85.97%, docs/training.md). SGD + Nesterov, cosine,
  label smoothing 0.1, weight decay 5e-4 (not on BN, biases or depthwise filters), pad-and-crop + flip.
- gpu: MobileNet V2 1.0 with ``small_input``, 100 epochs, batch 256, EMA, bf16 autocast, channels_last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"

RECIPES = {
    "cpu": dict(
        model="mobilenet_v1_0.5_224",
        epochs=16,
        batch_size=128,
        lr=0.1,
        channels_last=True,
        num_workers=0,  # images are decoded once into memory and augmented per batch in the training process
        threads=2,
        device="cpu",
    ),
    "gpu": dict(
        model="mobilenet_v2_1.0_224",
        epochs=100,
        batch_size=256,
        lr=0.2,
        ema_decay=0.999,
        channels_last=True,
        num_workers=8,
        device="cuda",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--out", default=None, help="run directory (default runs/cifar10_<recipe>)")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="the CIFAR-10 ImageFolder tree (train/, test/) (default: ../shared/data/cifar10 beside the checkout)",
    )
    args = parser.parse_args()

    from mobilenet.evaluate import evaluate_checkpoint
    from mobilenet.train import TrainConfig, train

    options = dict(RECIPES[args.recipe])
    if args.epochs:
        options["epochs"] = args.epochs
    out = args.out or f"runs/cifar10_{args.recipe}"
    config = TrainConfig(data=args.data, out=out, resume=args.resume, **options)
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started
    train_seconds = sum(row["epoch_seconds"] for row in result.history)
    final = evaluate_checkpoint(result.last_checkpoint, args.data, device=options["device"], progress=False)
    report = {
        "recipe": args.recipe,
        "config": config.to_dict(),
        "epochs": result.epochs_done,
        "test_top1_last": final["top1"],
        "test_top1_best": result.best_top1,
        "training_seconds": round(train_seconds, 1),
        "wall_seconds_including_data_and_eval": round(wall, 1),
        "train_images_per_s_last_epoch": round(result.history[-1]["images_per_s"], 1) if result.history else None,
    }
    print(json.dumps(report, indent=2))
    print(
        f"CIFAR-10 test top-1 {final['top1']:.2%} (best epoch {result.best_top1:.2%}) "
        f"after {result.epochs_done} epochs; "
        f"training {train_seconds / 60:.1f} min, wall {wall / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
