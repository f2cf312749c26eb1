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
                raise SystemExit(f"{path} is not a JPEG; the pack holds JPEG bytes only")
            images.append(data)
            labels.append(label)
    return images, labels


def pack_folder(src: Path, out: Path, *, limit: int | None = None, name: str = "cifar10") -> dict[str, Any]:
    """Pack ``src`` (train/ and test/ class folders) into ``out``; returns what was written."""
    classes = sorted(path.name for path in (src / "train").iterdir() if path.is_dir())
    splits = {split: read_split(src / split, classes, limit) for split in ("train", "test")}
    out.parent.mkdir(parents=True, exist_ok=True)
    size = write_pack(out, name=name, classes=classes, splits=splits)
    return {"path": str(out), "bytes": size, "classes": classes, **{s: len(v[1]) for s, v in splits.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="../shared/data/cifar10", help="the CIFAR-10 tree (train/, test/)")
    parser.add_argument("--out", default="gpu_run/cifar10.pack", help="the pack to write")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per class and split")
    parser.add_argument("--max-mib", type=float, default=60.0, help="fail when the pack is larger")
    args = parser.parse_args(argv)
    summary = pack_folder(Path(args.src), Path(args.out), limit=args.limit)
    mib = summary["bytes"] / 2**20
    print(f"{summary['path']}: {summary['train']} train + {summary['test']} test images, {mib:.1f} MiB")
    if mib > args.max_mib:
        print(f"the pack is larger than {args.max_mib:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
