"""Pack the CIFAR-10 JPEG tree into one file for a machine that gets only the working tree (docs/reproduce.md).

Reads ``SRC/train/<class>/*.jpg`` and ``SRC/test/<class>/*.jpg`` (classes in sorted order, files sorted by name)
and writes their bytes, unchanged, with the labels and class names as one image pack (:mod:`mobilenet.pack`):

    python benchmarks/pack_cifar10.py --src ../shared/data/cifar10 --out gpu_run/cifar10.pack

``--limit N`` keeps the first N images of each class per split (a small pack for a rehearsal). The pack must stay
under ``--max-mib`` (60: the GPU machine receives at most 64 MiB of working tree).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mobilenet.errors import MobileNetError
from mobilenet.pack import write_pack

JPEG_START = b"\xff\xd8"


def read_split(folder: Path, classes: list[str], limit: int | None) -> tuple[list[bytes], list[int]]:
    """Every JPEG of ``folder/<class>/`` with its label (the class's index), at most ``limit`` per class."""
    images: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(path for path in (folder / name).iterdir() if path.is_file())[:limit]
        for path in files:
            data = path.read_bytes()
            if not data.startswith(JPEG_START):
                raise MobileNetError(f"{path} is not a JPEG; the pack holds JPEG bytes only")
            images.append(data)
            labels.append(label)
    return images, labels


def split_classes(src: Path) -> list[str]:
    """The class folders of ``src/train``, which ``src/test`` must have too (MobileNetError otherwise)."""
    folders = {split: src / split for split in ("train", "test")}
    missing = [str(folder) for folder in folders.values() if not folder.is_dir()]
    if missing:
        raise MobileNetError(f"{', '.join(missing)}: not a folder; expected SRC/train/<class>/ and SRC/test/<class>/")
    classes = sorted(path.name for path in folders["train"].iterdir() if path.is_dir())
    absent = [name for name in classes if not (folders["test"] / name).is_dir()]
    if not classes or absent:
        raise MobileNetError(
            f"{src}: {'no class folders in train/' if not classes else f'test/ lacks the classes {absent[:3]}'}; "
            "expected the same class folders in train/ and test/"
        )
    return classes


def pack_folder(
    src: Path, out: Path, *, limit: int | None = None, name: str = "cifar10", max_bytes: float = float("inf")
) -> dict[str, Any]:
    """Pack ``src`` (train/ and test/ class folders) into ``out``; returns what was written. Nothing is written
    where the images alone exceed ``max_bytes``."""
    classes = split_classes(src)
    splits = {split: read_split(src / split, classes, limit) for split in ("train", "test")}
    image_bytes = sum(len(image) for images, _ in splits.values() for image in images)
    if image_bytes > max_bytes:
        raise MobileNetError(
            f"the images alone take {image_bytes / 2**20:.1f} MiB, over the pack's limit; nothing written"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        size = write_pack(out, name=name, classes=classes, splits=splits)
    except OSError as error:
        raise MobileNetError(f"{out}: cannot write the pack ({error.strerror or error})") from None
    return {"path": str(out), "bytes": size, "classes": classes, **{s: len(v[1]) for s, v in splits.items()}}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of images")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="../shared/data/cifar10", help="the CIFAR-10 tree (train/, test/)")
    parser.add_argument("--out", default="gpu_run/cifar10.pack", help="the pack to write")
    parser.add_argument("--limit", type=positive_int, default=None, help="at most this many images per class and split")
    parser.add_argument("--max-mib", type=float, default=60.0, help="fail when the pack is larger")
    args = parser.parse_args(argv)
    try:
        summary = pack_folder(Path(args.src), Path(args.out), limit=args.limit, max_bytes=args.max_mib * 2**20)
    except (MobileNetError, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        where = f"{error.filename}: " if isinstance(error, OSError) and error.filename else ""
        print(f"pack_cifar10: error: {where}{reason}", file=sys.stderr)
        return 2
    mib = summary["bytes"] / 2**20
    print(f"{summary['path']}: {summary['train']} train + {summary['test']} test images, {mib:.1f} MiB")
    if mib > args.max_mib:
        print(f"the pack is larger than {args.max_mib:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
