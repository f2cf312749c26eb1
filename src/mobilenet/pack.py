"""Image packs: a labelled image set as one file of encoded image bytes, decoded in one batched call.

A machine that receives only a small working tree (no dataset folder) gets CIFAR-10 as one ``.pack`` file of its
JPEG bytes (about 53 MiB for the 60,000 images, where the decoded pixels take 184 MiB). The layout, with no pickle:

- 8 bytes ``MNPACK01``, then the length of the header as an unsigned 64-bit little-endian integer;
- the header, UTF-8 JSON: ``name``, ``classes``, and per split (``train``, ``test``...) its ``count`` and where
  its arrays start, relative to the end of the header: ``offsets_at`` (``count + 1`` int64 byte offsets into the
  split's data), ``labels_at`` (``count`` int64 labels) and ``data_at`` (the images' bytes, one after another).

:func:`decode_split` decodes a split with ``torchvision.io.decode_jpeg`` on a list of images at once: on the GPU
(nvJPEG) when one is asked for, on the CPU otherwise.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from mobilenet.errors import MobileNetError
from mobilenet.io import atomic_write_bytes, libjpeg_lost_data, libjpeg_warnings, loads_json, regular_file_size

__all__ = ["MAGIC", "ImagePack", "PackSplit", "decode_split", "read_pack", "write_pack"]

MAGIC = b"MNPACK01"
_LENGTH = struct.Struct("<Q")
#: Images per decode_jpeg call: large enough to keep nvJPEG's batches full, small enough to bound host memory.
DECODE_CHUNK = 8192


@dataclass(frozen=True)
class PackSplit:
    """One split of a pack: the encoded images (``data[offsets[i]:offsets[i + 1]]`` is image ``i``) and labels."""

    data: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def encoded(self, index: int) -> torch.Tensor:
        return self.data[int(self.offsets[index]) : int(self.offsets[index + 1])]


@dataclass(frozen=True)
class ImagePack:
    name: str
    classes: list[str]
    splits: dict[str, PackSplit]


def write_pack(
    path: str | os.PathLike[str],
    *,
    name: str,
    classes: Sequence[str],
    splits: dict[str, tuple[Sequence[bytes], Sequence[int]]],
) -> int:
    """Write ``splits`` (split name -> (encoded images, labels)) as one pack file; returns its size in bytes."""
    header: dict[str, Any] = {"format": 1, "name": name, "classes": list(classes), "splits": {}}
    problem = _header_problem(header)
    if problem:
        raise MobileNetError(f"cannot write an image pack whose header is damaged: {problem}")
    chunks: list[bytes] = []
    position = 0
    for split, (images, labels) in splits.items():
        if len(images) != len(labels):
            raise MobileNetError(f"pack split {split!r}: {len(images)} images but {len(labels)} labels")
        if any(type(label) is not int or not 0 <= label < len(classes) for label in labels):
            raise MobileNetError(
                f"pack split {split!r}: labels must be class indices 0 to {len(classes) - 1} ({len(classes)} classes)"
            )
        offsets = [0]
        for image in images:
            offsets.append(offsets[-1] + len(image))
        arrays = (
            struct.pack(f"<{len(offsets)}q", *offsets),
            struct.pack(f"<{len(labels)}q", *labels),
            b"".join(images),
        )
        # Each split's arrays start at a multiple of 8 bytes, so they can be read as int64 in place.
        arrays += (bytes(-sum(len(array) for array in arrays) % 8),)
        header["splits"][split] = {
            "count": len(images),
            "offsets_at": position,
            "labels_at": position + len(arrays[0]),
            "data_at": position + len(arrays[0]) + len(arrays[1]),
        }
        chunks += arrays
        position += sum(len(array) for array in arrays)
    text = json.dumps(header).encode()
    blob = MAGIC + _LENGTH.pack(len(text)) + text + b"".join(chunks)
    atomic_write_bytes(path, blob)
    return len(blob)


def read_pack(path: str | os.PathLike[str]) -> ImagePack:
    """Read a pack file written by :func:`write_pack` (the images stay encoded: see :func:`decode_split`)."""
    regular_file_size(Path(path), "image pack", "a .pack file written by benchmarks/pack_cifar10.py")
    raw = Path(path).read_bytes()
    if raw[: len(MAGIC)] != MAGIC:
        raise MobileNetError(f"{path} is not an image pack (it does not start with {MAGIC.decode()})")
    start = len(MAGIC) + _LENGTH.size
    try:
        (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
        header = loads_json(raw[start : start + length])
    except (struct.error, ValueError):
        raise MobileNetError(f"{path}: the image pack is truncated or its header is damaged") from None
    problem = _header_problem(header)
    if problem:
        raise MobileNetError(
            f"{path}: the image pack's header is damaged: {problem} (expected the header benchmarks/pack_cifar10.py "
            "writes: a name, a list of distinct class names, and per split non-negative integer positions)"
        )
    name, classes, wheres = header["name"], header["classes"], header["splits"]
    try:
        body = torch.frombuffer(bytearray(raw[start + length :]), dtype=torch.uint8)
        splits = {split: _split(body, where) for split, where in wheres.items()}
    except (struct.error, ValueError, KeyError, TypeError, IndexError, RuntimeError):
        raise MobileNetError(f"{path}: the image pack is truncated or its header is damaged") from None
    for split_name, split in splits.items():
        if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= len(classes)):
            raise MobileNetError(
                f"{path}: split {split_name!r} holds labels from {int(split.labels.min())} to "
                f"{int(split.labels.max())}; expected class indices 0 to {len(classes) - 1} ({len(classes)} classes)"
            )
    return ImagePack(name, classes, splits)


def _header_problem(header: Any) -> str | None:
    """What is wrong with a pack header's name, classes or split positions, or None where each has its type: one
    or more distinct class names, and non-negative integer counts and positions."""
    if not isinstance(header, dict) or not isinstance(header.get("splits"), dict):
        return "it is not an object with a 'splits' object"
    classes = header.get("classes")
    if not isinstance(header.get("name"), str):
        return "its name is not text"
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        return "its classes are not a list of names"
    if len(set(classes)) != len(classes):
        return "its class names repeat"
    for split, where in header["splits"].items():
        fields = (
            [where.get(key) for key in ("count", "offsets_at", "labels_at", "data_at")]
            if isinstance(where, dict)
            else []
        )
        if not fields or not all(type(value) is int and value >= 0 for value in fields):
            return f"split {split!r} lacks non-negative integer count, offsets_at, labels_at and data_at"
    return None


def _split(body: torch.Tensor, where: dict[str, int]) -> PackSplit:
    """One split's arrays, checked against the header (counts, offsets that start at 0 and never decrease, and data
    inside the file)."""
    offsets = body[where["offsets_at"] : where["labels_at"]].view(torch.int64)
    labels = body[where["labels_at"] : where["data_at"]].view(torch.int64)
    if offsets.shape[0] != where["count"] + 1 or labels.shape[0] != where["count"]:
        raise ValueError("split inconsistent with the header")
    if int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("image offsets out of order")
    end = where["data_at"] + int(offsets[-1])
    if end > body.shape[0]:
        raise ValueError("image data beyond the end of the file")
    return PackSplit(body[where["data_at"] : end], offsets, labels.clone())


def decode_split(split: PackSplit, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Every image of ``split`` as one uint8 ``N x 3 x H x W`` tensor on the CPU (the images must share one size),
    decoded on ``device`` (a CUDA device uses nvJPEG; None or "cpu": libjpeg-turbo)."""
    target = torch.device(device) if device is not None else torch.device("cpu")
    decoded: list[torch.Tensor] = []
    for first in range(0, len(split), DECODE_CHUNK):
        encoded = [split.encoded(i) for i in range(first, min(first + DECODE_CHUNK, len(split)))]
        try:
            with libjpeg_warnings() as warnings:
                images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=target)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MobileNetError(
                f"an image of the pack (from index {first}) is not a decodable JPEG: {reason}"
            ) from None
        lost = libjpeg_lost_data(warnings)
        if lost:
            raise MobileNetError(
                f"an image of the pack (from index {first}) is a truncated or damaged JPEG (libjpeg: {lost}); "
                "expected complete images"
            )
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) != 1:
            raise MobileNetError(f"the images of an image pack must share one size; found {sorted(shapes)[:3]}")
        decoded.append(torch.stack(images).cpu())
    return torch.cat(decoded) if decoded else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
