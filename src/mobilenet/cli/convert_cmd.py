"""``mobilenet convert --from torchvision|timm FILE --model NAME --out OUT``: a foreign checkpoint becomes ours.

The foreign file (torchvision ``.pth``, timm ``.pth`` / ``.safetensors``) is read with ``torch.load(weights_only=True)``
or safetensors, its keys are mapped onto the named model, and the source library's own model, loaded with the same
weights, must give the same logits on a random batch before anything is written.
"""

from __future__ import annotations

import argparse

from mobilenet.cli import shown_path

SOURCES = ("torchvision", "timm")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert torchvision/timm MobileNet weights to a mobilenet .safetensors checkpoint",
        description=(
            "Convert a torchvision or timm MobileNet checkpoint (.pth or .safetensors) into a mobilenet checkpoint, "
            "checking that both give the same logits. With --download, fetch the library's ImageNet weights "
            "instead of reading FILE."
        ),
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="the torchvision/timm weights file")
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the library that wrote FILE")
    parser.add_argument("--model", required=True, metavar="NAME", help="our model name, e.g. mobilenet_v2_1.0_224")
    parser.add_argument("--out", required=True, metavar="OUT", help="the .safetensors checkpoint to write")
    parser.add_argument(
        "--keep-background",
        action="store_true",
        help="keep a TF-style 1001-class head (background at index 0) instead of dropping its background row",
    )
    parser.add_argument(
        "--no-check", dest="check", action="store_false", help="skip the logit comparison with the source library"
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="download the source library's ImageNet weights for --model instead of reading FILE (needs network)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mobilenet.checkpoint import check_checkpoint_path, save
    from mobilenet.convert import LOGIT_RTOL, convert, pretrained_with_report
    from mobilenet.errors import MobileNetError
    from mobilenet.io import check_output_file

    if args.download == (args.file is not None):
        raise MobileNetError("give either FILE or --download (not both, not neither)")
    check_checkpoint_path(args.out, "--out")  # before a download or a conversion starts
    check_output_file(args.out, "--out", inputs=[args.file])
    if args.download:
        model, report = pretrained_with_report(args.model, args.source, check=args.check)
        metadata = {"converted_from": f"{args.source} pretrained", **report.to_dict()}
        save(model, args.out, classes=model.classes, preprocessing=model.preprocessing, metadata=metadata)
    else:
        report = convert(
            args.file,
            args.out,
            source=args.source,
            name=args.model,
            keep_background=args.keep_background,
            check=args.check,
        )
    head = f"{report.num_classes} classes" + (" (background row 0 dropped)" if report.dropped_background else "")
    print(f"converted {args.source} weights -> {args.model}, {head}")
    if report.max_abs_diff is None:
        print("logit check: skipped (--no-check)")
    else:
        print(
            f"logit check vs {report.reference}: max |ours - theirs| = {report.max_abs_diff:.3g} "
            f"(max |theirs| = {report.max_abs_reference:.3g}, tolerance {report.max_abs_reference * LOGIT_RTOL:.3g})"
        )
    print(f"wrote {shown_path(args.out)}")
    return 0
