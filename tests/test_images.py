"""mobilenet.images: the one decoder refuses an image whose data it would have to make up."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenet.images import BadImageError, decode_image


def _jpeg(height: int = 64, width: int = 48, *, progressive: bool = False) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def _cut_and_close(data: bytes) -> bytes:
    """The first half of an encoded JPEG, closed with an end-of-image marker: libjpeg decodes it with a warning and
    fills the missing rows with grey."""
    return data[: len(data) // 2] + b"\xff\xd9"


def _taller_header(data: bytes, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) declaring ``height`` rows: more than its scan data holds."""
    edited = bytearray(data)
    frame = edited.index(b"\xff\xc0")
    edited[frame + 5 : frame + 7] = struct.pack(">H", height)
    return bytes(edited)


@pytest.mark.parametrize("progressive", [False, True])
def test_a_truncated_jpeg_is_refused_not_padded(tmp_path, progressive):
    data = _jpeg(progressive=progressive)
    assert decode_image(data).shape == (3, 64, 48)  # the whole file decodes
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(_cut_and_close(data))
    for image in (bad, bad.read_bytes()):
        with pytest.raises(BadImageError, match=r"truncated or damaged.*expected a complete image file"):
            decode_image(image)


def test_a_jpeg_declaring_more_rows_than_its_data_is_refused():
    with pytest.raises(BadImageError, match="JPEG data is truncated or damaged"):
        decode_image(_taller_header(_jpeg(), 128), name="tall.jpg")


def test_the_decoder_does_not_swallow_or_add_to_stderr(capfd):
    decode_image(_jpeg())
    with pytest.raises(BadImageError):
        decode_image(_cut_and_close(_jpeg()))
    assert capfd.readouterr().err == ""  # libjpeg's warning became the error, not a stray line


def test_a_complete_jpeg_decodes_as_pil_decodes_it():
    data = _jpeg()
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    assert (decode_image(data).int() - expected.int()).abs().max() <= 2  # two libjpeg builds, IDCT rounding
