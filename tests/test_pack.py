"""Image packs: write, read back, decode in batches; a damaged file is a one-line error."""

from __future__ import annotations

import pytest
import torch
from torchvision.io import encode_jpeg

from mobilenet.errors import MobileNetError
from mobilenet.pack import decode_split, read_pack, write_pack


def _jpegs(count: int, size: int = 8) -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    return [
        bytes(encode_jpeg(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)).numpy())
        for _ in range(count)
    ]


def test_round_trip_keeps_every_image_label_and_class(tmp_path):
    train, test = _jpegs(5), _jpegs(3)
    size = write_pack(
        tmp_path / "p.pack",
        name="toy",
        classes=["x", "y"],
        splits={"train": (train, [1, 0, 1, 1, 0]), "test": (test, [0, 0, 1])},
    )
    assert size == (tmp_path / "p.pack").stat().st_size
    pack = read_pack(tmp_path / "p.pack")
    assert (pack.name, pack.classes) == ("toy", ["x", "y"])
    assert pack.splits["train"].labels.tolist() == [1, 0, 1, 1, 0]
    assert [bytes(pack.splits["test"].encoded(i).numpy()) for i in range(3)] == test
    decoded = decode_split(pack.splits["train"])
    assert decoded.shape == (5, 3, 8, 8) and decoded.dtype == torch.uint8


def test_not_a_pack_and_mixed_sizes_are_errors(tmp_path):
    (tmp_path / "bad.pack").write_bytes(b"hello world, not a pack")
    with pytest.raises(MobileNetError, match="not an image pack"):
        read_pack(tmp_path / "bad.pack")
    write_pack(tmp_path / "cut.pack", name="c", classes=["a"], splits={"train": (_jpegs(3), [0, 0, 0])})
    (tmp_path / "cut.pack").write_bytes((tmp_path / "cut.pack").read_bytes()[:-100])
    with pytest.raises(MobileNetError, match="truncated"):
        read_pack(tmp_path / "cut.pack")
    write_pack(
        tmp_path / "mixed.pack", name="m", classes=["a"], splits={"train": (_jpegs(1, 8) + _jpegs(1, 16), [0, 0])}
    )
    with pytest.raises(MobileNetError, match="share one size"):
        decode_split(read_pack(tmp_path / "mixed.pack").splits["train"])


def test_a_fifo_or_a_corrupt_jpeg_in_a_pack_is_one_error(tmp_path):
    import os

    os.mkfifo(tmp_path / "x.pack")
    with pytest.raises(MobileNetError, match="not a regular file"):
        read_pack(tmp_path / "x.pack")  # refused unopened: reading a FIFO would block
    write_pack(tmp_path / "bad.pack", name="b", classes=["a"], splits={"train": ([b"\xff\xd8 not a jpeg"], [0])})
    with pytest.raises(MobileNetError, match="not a decodable JPEG"):
        decode_split(read_pack(tmp_path / "bad.pack").splits["train"])


def test_a_pack_header_nested_too_deeply_is_a_damaged_header(tmp_path):
    import struct

    header = b"[" * 100_000 + b"]" * 100_000  # the JSON parser would raise RecursionError
    (tmp_path / "deep.pack").write_bytes(b"MNPACK01" + struct.pack("<Q", len(header)) + header)
    with pytest.raises(MobileNetError, match="header is damaged"):
        read_pack(tmp_path / "deep.pack")


def test_a_truncated_jpeg_in_a_pack_is_refused_not_padded(tmp_path):
    good = _jpegs(2, size=64)
    cut = good[1][: len(good[1]) // 2] + b"\xff\xd9"  # libjpeg pads the missing rows with grey and only warns
    write_pack(tmp_path / "p.pack", name="toy", classes=["x"], splits={"test": ([good[0], cut], [0, 0])})
    with pytest.raises(MobileNetError, match="truncated or damaged JPEG"):
        decode_split(read_pack(tmp_path / "p.pack").splits["test"])


@pytest.mark.parametrize(
    "classes, labels, words",
    [
        (["x", "x"], [0, 1], "class names repeat"),
        ([], [0, 0], "classes are not a list of names"),
        (["x", ""], [0, 1], "classes are not a list of names"),
        (["x", "y"], [0, 2], "labels must be class indices 0 to 1"),
        (["x", "y"], [-1, 0], "labels must be class indices"),
        (["x", "y"], [0.0, 1], "labels must be class indices"),
    ],
)
def test_a_pack_its_reader_would_refuse_is_not_written(tmp_path, classes, labels, words):
    out = tmp_path / "p.pack"
    with pytest.raises(MobileNetError, match=words):
        write_pack(out, name="toy", classes=classes, splits={"train": (_jpegs(2), labels)})
    assert not out.exists()
