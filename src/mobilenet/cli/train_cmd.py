"""``mobilenet train --model NAME --data SRC --out RUN_DIR``: train or resume a run (see docs/training.md)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a MobileNet on an image folder, CIFAR or the built-in digits",
        description="Train a MobileNet. Distributed: torchrun --nproc_per_node=N -m mobilenet train ...",
    )
    parser.add_argument("--model", required=True, help="registered model name (see `mobilenet models`)")
    parser.add_argument(
        "--data", required=True, help="digits | cifar10 | cifar100 | DIR (DIR/train + DIR/val, or DIR/<class>)"
    )
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics, curves)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (split across processes)")
    parser.add_argument(
        "--recipe",
        choices=("modern", "paper"),
        default="modern",
        help="modern: SGD nesterov + cosine + warmup + label smoothing; paper: RMSprop (TF) 0.045, x0.98/epoch",
    )
    parser.add_argument("--optimizer", choices=("sgd", "rmsprop", "adamw"), help="override the recipe's optimizer")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's, scaled by batch size)")
    parser.add_argument(
        "--schedule",
        choices=("cosine", "exponential", "step", "constant"),
        help="learning-rate schedule after the warmup (default: the recipe's: cosine, or exponential for paper)",
    )
    parser.add_argument(
        "--warmup-epochs", type=float, help="linear warmup (default: 5%% of the run, at most 5 epochs; 0 for paper)"
    )
    parser.add_argument(
        "--weight-decay", type=float, help="L2 on conv/FC weights (default: 5e-4 at <= 64 px, else 4e-5; 0.05 AdamW)"
    )
    parser.add_argument("--decay-depthwise", action="store_true", help="also decay depthwise filters (V1 paper: don't)")
    parser.add_argument(
        "--label-smoothing", type=float, help="label smoothing (default: 0.1 in the modern recipe, 0 in paper)"
    )
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD / RMSprop momentum, in [0, 1)")
    parser.add_argument("--ema-decay", type=float, default=0.0, help="EMA of weights, e.g. 0.999 (0: off)")
    parser.add_argument(
        "--amp",
        choices=("auto", "off", "bf16", "fp16"),
        default="auto",
        help="mixed precision (auto: bf16 or fp16 on CUDA, off on the CPU)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="NHWC memory layout (default: on on the CPU, where it is faster; off elsewhere)",
    )
    parser.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the augmentation")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loading processes (0: in this process)")
    parser.add_argument("--resolution", type=int, help="input size (default: the data's image size, else the model's)")
    parser.add_argument("--alpha", type=float, help="width multiplier override")
    parser.add_argument(
        "--small-input",
        action=argparse.BooleanOptionalAction,
        help="stride-8 network for tiny images (default: on at <= 64 px)",
    )
    parser.add_argument("--dropout", type=float, help="dropout before the classifier (default: V1 0.001, V2 0.2)")
    parser.add_argument("--val-fraction", type=float, help="held-out fraction when the data has no val/ or test/")
    parser.add_argument(
        "--on-bad-image",
        choices=("skip", "error"),
        default="error",
        help="an undecodable image stops the run, or is left out",
    )
    parser.add_argument("--limit-train-batches", type=int, help="batches per epoch (quick experiments)")
    parser.add_argument("--crop-scale-min", type=float, default=0.08, help="RandomResizedCrop lower scale bound")
    parser.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: on, off for the built-in digits; --no-hflip for text)",
    )
    parser.add_argument(
        "--no-batch-augment",
        dest="batch_augment",
        action="store_false",
        help="per-image augmentation pipeline even where the per-batch one applies",
    )
    parser.add_argument(
        "--device-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the training images on the device and augment batches there, no loader workers (default: on "
        "for GPU runs whose data is one in-memory tensor at the input size)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--no-sync-bn", dest="sync_bn", action="store_false", help="no SyncBatchNorm under DDP on GPU")
    parser.add_argument(
        "--init",
        metavar="CHECKPOINT|torchvision|timm",
        help="fine-tune: start from a checkpoint's weights or the published ImageNet weights (new classifier if "
        "the classes differ; the learning rate defaults to 1/10 of the recipe's)",
    )
    parser.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="with --init: train the classifier only (the body and its BatchNorm statistics stay as loaded)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last state")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from mobilenet.train import TrainConfig, train

    # Every TrainConfig field has an option of the same name (tests/test_evaluate.py checks it).
    options = {field.name: getattr(args, field.name) for field in fields(TrainConfig) if hasattr(args, field.name)}
    result = train(TrainConfig(**options), progress=args.progress)
    return 130 if result.interrupted else 0
