"""LiteRT export (.tflite): parity with PyTorch in LiteRT's own interpreter, the metadata sidecar, the static batch
read back image by image, hostile files and inputs, the CLI, and the install hint where LiteRT is missing."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SMALL_PREPROCESSING, busy_batchnorm_model
from mobilenet.cli import main
from mobilenet.errors import MobileNetError
from mobilenet.export import export_litert, export_model, load_export

NAME = "mobilenet_v2_0.35_96"
PREPROCESSING = SMALL_PREPROCESSING
CLASSES = [f"class{i}" for i in range(10)]
SKIP_REASON = "LiteRT is an optional extra (pip install -e '.[litert]')"


def _require_litert() -> None:
    pytest.importorskip("litert_torch", reason=SKIP_REASON)
    pytest.importorskip("ai_edge_litert.interpreter", reason=SKIP_REASON)


def _assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 1.0  # the check is meaningful only for non-trivial logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4 + 1e-5 * scale


def _model(seed: int = 0) -> nn.Module:
    return busy_batchnorm_model(NAME, seed=seed, classifier_std=4.0)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model()


@pytest.fixture(scope="module")
def tflite_file(model, tmp_path_factory):
    _require_litert()
    path = tmp_path_factory.mktemp("litert") / "m.tflite"
    result = export_litert(model, path, classes=CLASSES, preprocessing=PREPROCESSING)
    return path, result


def _seeded(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_litert_equals_pytorch_at_batch_1(model, tflite_file, seed):
    from mobilenet.export import tflite_runner

    x = _seeded(1, seed)
    with torch.no_grad():
        expected = model(x)
    _assert_close_to_scale(tflite_runner(tflite_file[0])(x), expected)


def test_litert_read_back_runs_a_larger_batch_image_by_image(model, tflite_file):
    loaded = load_export(tflite_file[0])
    assert loaded.format == "litert"
    x = _seeded(7, 5)
    with torch.no_grad():
        expected = model(x)
    _assert_close_to_scale(loaded.run(x), expected)


def test_litert_input_is_nchw_batch_1_in_the_interpreter(tflite_file):
    """Read with LiteRT's interpreter itself: one float32 input of the PyTorch signature's NCHW shape at batch 1,
    one (1, classes) output."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tflite_file[0]))
    (image,), (logits,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert image["shape"].tolist() == [1, 3, 32, 32] and image["dtype"] == np.float32
    assert logits["shape"].tolist() == [1, 10]


def test_litert_sidecar_says_batch_and_precision(tflite_file):
    path, result = tflite_file
    sidecar = path.parent / "m.tflite.json"
    assert result.format == "litert" and result.extra_files == [sidecar]
    metadata = json.loads(sidecar.read_text())
    assert metadata["input"]["max_batch"] == 1 and metadata["input"]["batch"] == 1
    assert metadata["input"]["layout"] == "NCHW" and metadata["precision"] == "float32"
    assert metadata["classes"] == CLASSES and metadata["preprocessing"] == PREPROCESSING
    assert any("LiteRT" in check for check in result.checks)
    assert load_export(path).metadata == metadata


def test_litert_runner_follows_torch_thread_count(model, tflite_file):
    from mobilenet.export import tflite_runner

    runner = tflite_runner(tflite_file[0])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = _seeded(1, threads)
            with torch.no_grad():
                expected = model(x)
            _assert_close_to_scale(runner(x), expected)
            assert runner.threads == threads
    finally:
        torch.set_num_threads(before)


def test_litert_runner_refuses_bad_inputs(tflite_file):
    from mobilenet.export import tflite_runner

    runner = tflite_runner(tflite_file[0])
    bad = {
        "shape (2, 3, 32, 32)": torch.zeros(2, 3, 32, 32),  # the runner itself takes the static batch only
        "shape (0, 3, 32, 32)": torch.zeros(0, 3, 32, 32),
        "shape (1, 3, 64, 64)": torch.zeros(1, 3, 64, 64),
        "shape (1, 32, 32, 3)": torch.zeros(1, 32, 32, 3),  # NHWC is refused, not silently misread
        "shape (3, 32, 32)": torch.zeros(3, 32, 32),
        "torch.float64": torch.zeros(1, 3, 32, 32, dtype=torch.float64),
        "torch.uint8": torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
        "ndarray": np.zeros((1, 3, 32, 32), dtype=np.float32),
        "list": [[0.0]],
    }
    for words, x in bad.items():
        with pytest.raises(MobileNetError, match=r"float32 batches of shape \(1, 3, 32, 32\)") as caught:
            runner(x)
        assert words in str(caught.value)
    huge = torch.full((1, 3, 32, 32), 1e30)
    assert runner(huge).shape == (1, 10)  # huge values run (to inf/nan logits) without crashing the process
    assert runner(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # still usable after the refusals


def test_litert_refuses_files_that_are_not_models(tflite_file, tmp_path):
    from mobilenet.export import tflite_runner

    path, _result = tflite_file
    metadata = (path.parent / "m.tflite.json").read_text()
    data = path.read_bytes()
    cases = {
        "truncated.tflite": data[: len(data) // 2],
        "header.tflite": data[:64],
        "garbage.tflite": b"not a flatbuffer at all" * 20,
        "zeros.tflite": b"\x00" * 256,
        "empty.tflite": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        (tmp_path / (name + ".json")).write_text(metadata)
        with pytest.raises(MobileNetError, match=re.escape(name)):
            tflite_runner(tmp_path / name)
        with pytest.raises(MobileNetError, match=re.escape(name)):
            load_export(tmp_path / name)
    with pytest.raises(MobileNetError, match=r"does not exist|not a regular file"):
        tflite_runner(tmp_path / "missing.tflite")
    with pytest.raises(MobileNetError, match="is a directory"):
        tflite_runner(tmp_path)


def test_litert_refuses_a_missing_or_corrupt_sidecar(tflite_file, tmp_path):
    """The metadata is in <file>.json beside the .tflite: without it, or with something else there, load_export
    names the file and says what it expected."""
    copy = tmp_path / "copy.tflite"
    copy.write_bytes(tflite_file[0].read_bytes())
    with pytest.raises(MobileNetError, match=r"copy\.tflite has no metadata beside it; expected copy\.tflite\.json"):
        load_export(copy)
    sidecar = tmp_path / "copy.tflite.json"
    for content in ("{not json", "[1, 2]", '{"name": "x"}', "\x00\xff" * 10, ""):
        sidecar.write_text(content, encoding="latin-1")
        with pytest.raises(MobileNetError, match=r"copy\.tflite\.json has no mobilenet metadata"):
            load_export(copy)


def test_litert_mismatch_writes_nothing(model, tmp_path):
    """A difference above the bound (here a bound no float32 runtime meets) fails the export and leaves nothing at
    the target, neither the .tflite nor its metadata."""
    _require_litert()
    target = tmp_path / "m.tflite"
    with pytest.raises(MobileNetError, match="the file was not written"):
        export_litert(model, target, atol=1e-12, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_litert(model, tmp_path, capsys):
    _require_litert()
    from mobilenet.checkpoint import save

    checkpoint = save(model, tmp_path / "m.safetensors", classes=CLASSES, preprocessing=PREPROCESSING)
    assert main(["export", str(checkpoint), "--format", "litert"]) == 0
    out = capsys.readouterr().out
    target = tmp_path / "m.tflite"
    assert f"wrote {target}" in out and "litert" in out and "LiteRT interpreter" in out
    assert "[START]" not in out  # the converter's progress lines stay off the CLI's output
    loaded = load_export(target)
    assert loaded.metadata["classes"] == CLASSES
    x = _seeded(2, 3)
    with torch.no_grad():
        expected = model(x)
    _assert_close_to_scale(loaded.run(x), expected)


# ----------------------------------------------------------------------------------------------------------------
# Without LiteRT (runs everywhere, CI included)
# ----------------------------------------------------------------------------------------------------------------

HINT = "pip install litert-torch ai-edge-litert (in a checkout of mobilenet: pip install -e '.[litert]')"


@pytest.fixture
def no_litert(monkeypatch):
    """As if the litert extra were not installed: importing either package fails."""
    for name in ("litert_torch", "ai_edge_litert", "ai_edge_litert.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)


def test_litert_missing_gives_the_install_hint(model, tmp_path, no_litert):
    with pytest.raises(MobileNetError, match=re.escape(HINT)):
        export_model(model, tmp_path / "m.tflite", format="litert")
    file = tmp_path / "given.tflite"
    file.write_bytes(b"TFL3" * 16)
    (tmp_path / "given.tflite.json").write_text(json.dumps({"config": model.config.to_dict()}))
    with pytest.raises(MobileNetError, match=re.escape(HINT)):
        load_export(file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given.tflite", "given.tflite.json"]


def test_cli_export_litert_refuses_max_batch(model, tmp_path, capsys):
    """A .tflite is written for batch 1: --max-batch is refused before anything is read or imported."""
    out = tmp_path / "m.tflite"
    assert main(["export", "mobilenet_v2_0.35_96", "--format", "litert", "--out", str(out), "--max-batch", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-batch applies to --format pte only" in err and "batch 1" in err and "\n" not in err
    assert not out.exists()


def test_cli_export_litert_missing_is_one_line(model, tmp_path, capsys, no_litert):
    from mobilenet.checkpoint import save

    checkpoint = save(model, tmp_path / "m.safetensors", classes=CLASSES, preprocessing=PREPROCESSING)
    out = tmp_path / "m.tflite"
    assert main(["export", str(checkpoint), "--format", "litert", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobilenet export: error:") and "\n" not in err and HINT in err
    assert not out.exists() and not (tmp_path / "m.tflite.json").exists()
