"""``mobilenet compress CHECKPOINT --classifier-rank R --out OUT [--data DIR [--fine-tune-epochs N]]``: factor a
trained model's classifier by truncated SVD (:func:`mobilenet.compress.compress_checkpoint`)."""

from __future__ import annotations

import argparse
import json
import sys

from mobilenet.cli import shown_path

FORMATS = ("table", "json")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="factor a checkpoint's classifier by truncated SVD (features -> R -> classes), optionally fine-tune",
        description=(
            "Replace the classifier's weight matrix W (out x in) by its rank-R truncated SVD, two linear layers "
            "in -> R -> out (sqrt of the singular values in each), and write a checkpoint every command reads. "
            "With --data, report the validation top-1 before and after; with --fine-tune-epochs, fine-tune first."
        ),
    )
    parser.add_argument("checkpoint", help="a .safetensors checkpoint of this library")
    parser.add_argument(
        "--classifier-rank", type=int, required=True, dest="rank", metavar="R", help="1 <= R <= min(in, out)"
    )
    parser.add_argument("--out", required=True, help="the compressed checkpoint to write (.safetensors)")
    parser.add_argument("--data", help="the data the model was trained on (a class-folder directory, cifar10, ...)")
    parser.add_argument(
        "--fine-tune-epochs", type=int, default=0, dest="fine_tune_epochs", metavar="N", help="default 0 (none)"
    )
    parser.add_argument("--batch-size", type=int, default=64, dest="batch_size", help="default 64")
    parser.add_argument("--lr", type=float, help="fine-tuning learning rate (default 0.01 per 128 images)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--format", choices=FORMATS, default="table", help="summary format (default: table)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mobilenet.checkpoint import check_checkpoint_path
    from mobilenet.compress import compress_checkpoint
    from mobilenet.io import check_output_file

    # Before the SVD and any fine-tuning: never over the checkpoint it reads, nor where it could not be written.
    check_checkpoint_path(args.out, "--out")
    check_output_file(args.out, "--out", inputs=[args.checkpoint])
    log = (lambda message: print(message, file=sys.stderr)) if args.format == "json" else print
    report = compress_checkpoint(
        args.checkpoint,
        args.rank,
        args.out,
        fine_tune_epochs=args.fine_tune_epochs,
        data=args.data,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        log=log,
    )
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    factors = report.factorisation
    print(
        f"classifier {factors.in_features} -> {factors.out_features} factored at rank {factors.rank} of "
        f"{factors.full_rank}: {factors.params_full:,} -> {factors.params_factored:,} weights "
        f"({factors.params_factored / factors.params_full:.2%}); kept {factors.energy_kept:.2%} of the squared "
        f"singular values (relative error {factors.relative_error:.4f})"
    )
    print(
        f"model: {report.params_before:,} -> {report.params_after:,} parameters, {report.macs_before:,} -> "
        f"{report.macs_after:,} MACs (papers' convention: conv + FC weights; 1 MAC = 1 multiply-add = 2 FLOPs)"
    )
    if report.top1:
        print("validation top-1: " + ", ".join(f"{key} {value:.2%}" for key, value in report.top1.items()))
    print(f"wrote {shown_path(report.out)}")
    return 0
