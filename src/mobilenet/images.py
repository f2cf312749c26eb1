"""The one image decoder: any image input -> a uint8 RGB tensor of shape (3, H, W), or :class:`BadImageError`.

Training, evaluation, prediction and quantization calibration all decode through :func:`decode_image`, so a file
is read the same way everywhere and a bad one gets the same one-line message everywhere.

Validation comes before decoding, because decoders are C code that trusts what a file declares:

- a path must name a regular file (a FIFO would block forever, ``/dev/zero`` never ends) of at most
  :data:`MAX_FILE_BYTES`;
- the header is read first (PIL reads only the header when it opens a file) and an image that declares more than
  PIL's ``Image.MAX_IMAGE_PIXELS`` pixels is refused before any pixel memory is allocated (a decompression bomb);
- JPEG, WebP and GIF are decoded by torchvision.io (libjpeg-turbo: fast, CMYK-aware); PNG and every other format by
  PIL, whose PNG reader reports a malformed stream as a Python exception, where libpng's error path inside
  torchvision can take the whole process down. A PNG whose image data holds fewer rows than its header declares
  is refused by :func:`png_data_is_complete` instead of being padded with zeros;
- a JPEG whose scan data ends before every pixel its header declares (libjpeg pads the rest with grey and only
  prints a warning on stderr) is refused: the C library's stderr is swapped for a buffer around the decode
  (:func:`mobilenet.io.libjpeg_warnings`), and a warning that says data was lost or damaged refuses the image.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image

from mobilenet.errors import MobileNetError
from mobilenet.io import libjpeg_lost_data, libjpeg_warnings, regular_file_size

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_FILE_BYTES",
    "BadImageError",
    "decode_image",
    "find_images",
    "max_image_pixels",
    "png_data_is_complete",
    "read_image_file",
]

#: File suffixes taken as images when a directory is scanned (datasets, ``predict DIR``, calibration folders).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
#: The largest image file read: far above any photo, far below what would exhaust memory.
MAX_FILE_BYTES = 256 * 1024 * 1024
#: Formats whose torchvision decoder is used (it is faster than PIL's for these); the rest go to PIL.
_TORCHVISION_FORMATS = ("JPEG", "WEBP", "GIF")
_KNOWN_FORMATS = "JPEG, PNG, WebP, GIF, BMP, TIFF, PPM"


class BadImageError(MobileNetError):
    """An input that is not a decodable image (the message names the input and why)."""


def max_image_pixels() -> int:
    """The largest pixel count decoded: PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, which a
    user may raise or lower for the whole process)."""
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit else 2**62


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of an image file, after checking that it is a regular file of a sane size.

    A FIFO, socket or device is refused before it is opened (reading one would block or never end).
    """
    file = Path(path)
    try:
        size = regular_file_size(file, "image", "an image file")
    except MobileNetError as error:
        raise BadImageError(str(error)) from None
    if size > MAX_FILE_BYTES:
        raise BadImageError(f"image {file} is {size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit for one image")
    try:
        with open(file, "rb") as handle:
            return handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise BadImageError(f"cannot read image {file}: {error.strerror or error}") from None


def decode_image(image: Any, *, name: str | None = None) -> torch.Tensor:
    """Turn ``image`` into a uint8 RGB tensor of shape (3, H, W).

    Accepts a path (str or Path), encoded bytes, a PIL image, a numpy array (H, W), (H, W, C) uint8/uint16/float
    in 0-1, or a tensor (C, H, W) / (H, W). Grayscale is replicated to three channels, alpha is dropped, 16-bit is
    scaled to 8 bits (v * 255 / 65535, not clipped). Raises :class:`BadImageError` naming the input if it cannot
    be decoded.
    """
    label = name or (str(image) if isinstance(image, str | os.PathLike) else type(image).__name__)
    if isinstance(image, str | os.PathLike):
        return decode_bytes(read_image_file(image), label)
    if isinstance(image, bytes | bytearray | memoryview):
        return decode_bytes(bytes(image), label)
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(image, label)
    if isinstance(image, Image.Image):
        _check_pixels(image.size, label)
        return _pil_to_rgb(image, label)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, label)
    raise BadImageError(
        f"cannot use {label} as an image; expected a file path, bytes, a PIL image, a numpy array or a uint8 tensor"
    )


def decode_bytes(data: bytes, label: str) -> torch.Tensor:
    """Decode an encoded image (see the module docstring for the checks made first)."""
    if not data:
        raise BadImageError(f"cannot decode image {label}: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as header:
            image_format, size = header.format, header.size
    except UnidentifiedImageError:
        raise BadImageError(f"cannot decode image {label}: not an image in a known format ({_KNOWN_FORMATS})") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(f"cannot decode image {label}: {_reason(error)}; expected a smaller image") from None
    except (OSError, ValueError, SyntaxError, struct.error) as error:
        raise BadImageError(f"cannot decode image {label}: {_reason(error)}") from None
    _check_pixels(size, label)
    if image_format in _TORCHVISION_FORMATS:
        try:
            with libjpeg_warnings() as warnings:
                decoded = tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            pass  # a corrupt stream: PIL decodes it or says why in one line
        else:
            lost = libjpeg_lost_data(warnings)
            if lost:
                raise BadImageError(
                    f"cannot decode image {label}: its JPEG data is truncated or damaged (libjpeg: {lost}); "
                    "expected a complete image file"
                )
            # An animated GIF decodes to every frame (N, 3, H, W): the image is its first frame, as in PIL.
            return _to_uint8(decoded[0] if decoded.ndim == 4 else decoded)
    if image_format == "PNG" and not png_data_is_complete(data):
        raise BadImageError(f"cannot decode image {label}: its PNG data holds fewer rows than its header declares")
    return _decode_with_pil(data, label)


def _decode_with_pil(data: bytes, label: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _pil_to_rgb(img, label)
    except Image.DecompressionBombError:
        raise BadImageError(f"cannot decode image {label}: over the decompression-bomb pixel limit") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, zlib.error) as error:
        raise BadImageError(f"cannot decode image {label}: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def _check_pixels(size: tuple[int, int], label: str) -> None:
    width, height = size
    limit = max_image_pixels()
    if width * height > limit:
        raise BadImageError(
            f"image {label} declares {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
            "(PIL.Image.MAX_IMAGE_PIXELS, which guards against decompression bombs); expected a smaller image"
        )


# Bytes per pixel sample group and channels per PNG colour type (PNG spec, section 11.2.2 IHDR).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7 passes: (x start, y start, x step, y step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_data_is_complete(data: bytes) -> bool:
    """Whether a PNG's IDAT stream inflates to at least the bytes its IHDR declares (every row, with its filter
    byte; the seven Adam7 sub-images when interlaced). Malformed chunk structure counts as complete here: the
    decoder then reports it."""
    try:
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        channels = _PNG_CHANNELS[colour]
    except (struct.error, KeyError):
        return True
    inflater = zlib.decompressobj()
    inflated = 0
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"IDAT":
            try:
                inflated += len(inflater.decompress(data[offset + 8 : offset + 8 + length]))
            except zlib.error:
                return True
        offset += 12 + length
    return inflated >= _png_expected_bytes(width, height, depth * channels, interlace)


def _png_expected_bytes(width: int, height: int, bits_per_pixel: int, interlace: int) -> int:
    def image_bytes(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + math.ceil(w * bits_per_pixel / 8))

    if not interlace:
        return image_bytes(width, height)
    return sum(
        image_bytes(math.ceil(max(width - x0, 0) / dx), math.ceil(max(height - y0, 0) / dy))
        for x0, y0, dx, dy in _ADAM7
    )


def _to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype in (torch.uint16, torch.int32, torch.int64) or not tensor.is_floating_point():
        # 16-bit: scale the full 0..65535 range, not clip at 255 (PIL's convert("RGB") would clip).
        return (tensor.to(torch.float64) * (255.0 / 65535.0)).round().clamp(0, 255).to(torch.uint8)
    return (tensor.to(torch.float64) * 255.0).round().clamp(0, 255).to(torch.uint8)


def _pil_to_rgb(img: Image.Image, label: str) -> torch.Tensor:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(img)
        if mode == "F":
            array = np.clip(array, 0.0, 255.0) / 255.0
        elif mode == "I" and array.size and array.max() <= 255:
            array = array.astype(np.uint8)
        else:
            array = np.clip(array, 0, 65535).astype(np.uint16)
        return _array_to_rgb(array, label)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, P, YCbCr, 1
    return _array_to_rgb(np.asarray(img), label)


def _array_to_rgb(array: np.ndarray, label: str) -> torch.Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise BadImageError(f"image {label} has shape {array.shape}; expected (H, W) or (H, W, C) with C = 1, 3 or 4")
    if array.dtype == np.uint16:
        tensor = torch.from_numpy(array.astype(np.int32))
        tensor = (tensor.to(torch.float64) * (255.0 / 65535.0)).round().to(torch.uint8)
    elif array.dtype == np.uint8:
        # PIL's arrays are read-only; torch wants a writable buffer.
        tensor = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True, order="C"))
    elif np.issubdtype(array.dtype, np.floating):
        tensor = torch.from_numpy((np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    else:
        raise BadImageError(f"image {label} has dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]")
    return _channels_to_rgb(tensor.permute(2, 0, 1), label)


def _tensor_to_rgb(tensor: torch.Tensor, label: str) -> torch.Tensor:
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise BadImageError(
            f"image {label} has shape {tuple(tensor.shape)}; expected a (C, H, W) tensor with C = 1, 3 or 4"
        )
    if tensor.device.type == "meta" or tensor.is_complex():
        raise BadImageError(f"image {label} is a {tensor.dtype} tensor on {tensor.device}; expected real pixels")
    return _channels_to_rgb(_to_uint8(tensor.detach().cpu()), label)


def _channels_to_rgb(tensor: torch.Tensor, label: str) -> torch.Tensor:
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise BadImageError(f"image {label} is empty ({tuple(tensor.shape)})")
    if tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1).contiguous()
    return tensor[:3].contiguous()


def image_files_under(directory: Path) -> list[Path]:
    """The image files below ``directory`` (recursively, regular files only, by suffix), sorted."""
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def find_images(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories (recursively, sorted) into image files.

    A missing path or a directory with no image files raises :class:`MobileNetError` before anything runs; a file
    given by name is kept whatever its suffix (it is reported later if it does not decode).
    """
    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if not path.exists():
            raise MobileNetError(f"{path} does not exist; expected an image file or a directory of images")
        if path.is_dir():
            images = image_files_under(path)
            if not images:
                raise MobileNetError(
                    f"directory {path} has no image files; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
                )
            found.extend(images)
        else:
            found.append(path)
    return found
