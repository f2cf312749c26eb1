"""int8 ExecuTorch programs (XNNPACKQuantizer, PT2E): a save -> quantize -> read back -> predict round trip on real
images (scikit-learn's handwritten digits written as PNG files), checked against an int8 model built in the test
with the PT2E API directly; and the CLI's errors, which need no executorch."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from conftest import tiny_folder, trained_digits_checkpoint, write_images
from mobilenet.cli import main
from mobilenet.errors import MobileNetError
from mobilenet.models import create_model

STEPS = 90  # training steps (~80% held-out accuracy; chance is 10%)
CALIBRATION = 96  # training images that calibrate the int8 model
BOUND = 16  # the .pte's batch bound (calibration runs in batches of at most this)
NEEDS_EXECUTORCH = "ExecuTorch is an optional extra (pip install -e '.[mobile]')"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("quantize_pte")
    bundle, model, transform, checkpoint = trained_digits_checkpoint(root, STEPS)
    calibration, _ = write_images(bundle.train, root / "calibration", range(CALIBRATION))
    val, _ = write_images(bundle.val, root / "val", range(150))  # held out from training and calibration
    return {
        "root": root,
        "checkpoint": checkpoint,
        "model": model,
        "transform": transform,
        "calibration": calibration,
        "val": val,
    }


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A checkpoint and a folder of images for the error paths, which need no trained model."""
    from mobilenet.checkpoint import save

    root = tmp_path_factory.mktemp("quantize_pte_errors")
    model = create_model("mobilenet_v2_0.35_96", resolution=32, num_classes=3, small_input=True)
    checkpoint = save(model, root / "m.safetensors", classes=["a", "b", "c"])
    return {"checkpoint": checkpoint, "calibration": tiny_folder(root / "calibration", per_class=2)}


def _pytorch_int8(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """The reference: the unfolded model through torch.export and the PT2E API directly (prepare, calibrate,
    convert), without any of mobilenet's export code."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(model.eval(), (images[:2],), dynamic_shapes=({0: batch},), strict=False)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for chunk in images.split(BOUND):
            prepared(chunk)
    return convert_pt2e(prepared)


def _load(files, transform) -> torch.Tensor:
    from mobilenet.images import decode_image

    return torch.stack([transform(decode_image(path)) for path in files])


@pytest.mark.slow
def test_int8_pte_round_trip_matches_the_int8_model_in_pytorch(setup, capsys):
    pytest.importorskip("executorch", reason=NEEDS_EXECUTORCH)
    pytest.importorskip("torchao", reason=NEEDS_EXECUTORCH)
    from mobilenet.predict import Predictor

    root, checkpoint = setup["root"], setup["checkpoint"]
    out, fp32 = root / "digits.int8.pte", root / "digits.fp32.pte"
    argv = ["quantize", str(checkpoint), "--calibration", str(root / "calibration"), "--backend", "executorch"]
    code = main([*argv, "--out", str(out), "--max-batch", str(BOUND), "--keep-fp32", str(fp32)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"calibrated on {CALIBRATION} image(s) (histogram)" in printed.out
    assert "int8 top-1 equals fp32 top-1 on" in printed.out

    metadata = json.loads((root / "digits.int8.pte.json").read_text())
    assert metadata["precision"] == "int8" and metadata["input"]["max_batch"] == BOUND
    assert metadata["quantization"]["weights"] == "int8 symmetric, per channel"
    assert metadata["quantization"]["calibration_images"] == CALIBRATION
    assert json.loads((root / "digits.fp32.pte.json").read_text())["precision"] == "float32"
    assert out.stat().st_size < 0.6 * fp32.stat().st_size  # int8 weights: a quarter of fp32's bytes, plus overhead

    # Read back as predict does, on held-out images, and compare with the int8 model built here in PyTorch.
    predictor = Predictor(out)
    assert predictor.backend_name == "exported"
    predictions = predictor.predict(setup["val"], topk=1)
    assert all(p.ok for p in predictions)
    reference = _pytorch_int8(setup["model"], _load(setup["calibration"], setup["transform"]))
    with torch.no_grad():
        val = _load(setup["val"], setup["transform"])
        expected_int8 = reference(val).argmax(1).tolist()
        expected_fp32 = setup["model"](val).argmax(1).tolist()
    got = [p.index for p in predictions]
    agree_int8 = sum(a == b for a, b in zip(got, expected_int8, strict=True)) / len(got)
    agree_fp32 = sum(a == b for a, b in zip(got, expected_fp32, strict=True)) / len(got)
    assert agree_int8 >= 0.9, (agree_int8, agree_fp32)
    assert agree_fp32 >= 0.85, (agree_int8, agree_fp32)

    # eval reads it too (a batch of 64 runs in pieces of the program's bound).
    assert main(["eval", str(out), "--data", str(root / "val"), "--batch-size", "64"]) == 0, capsys.readouterr().err


def test_quantize_pte_refuses_bad_options_before_any_work(untrained, tmp_path):
    """Refused before executorch is imported: these run where it is not installed."""
    from mobilenet.quantize_pte import quantize_pte

    calibration = untrained["calibration"]
    for options, words in [
        ({"max_batch": 0}, "from 1 to 1024"),
        ({"max_batch": 5000}, "from 1 to 1024"),
        ({"max_batch": "8"}, "from 1 to 1024"),
        ({"num_calibration": 0}, "at least 1"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
    ]:
        with pytest.raises(MobileNetError, match=words):
            quantize_pte(untrained["checkpoint"], tmp_path / "q.pte", calibration, **options)
    assert not list(tmp_path.iterdir())


def test_quantize_pte_input_errors(untrained, tmp_path):
    pytest.importorskip("executorch", reason=NEEDS_EXECUTORCH)
    pytest.importorskip("torchao", reason=NEEDS_EXECUTORCH)
    from mobilenet.quantize_pte import quantize_pte

    checkpoint, calibration = untrained["checkpoint"], untrained["calibration"]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "a.png").write_bytes(b"not a png")
    (tmp_path / "a_dir").mkdir()
    cases = [
        ((checkpoint, tmp_path / "a_dir", calibration), {}, "directory"),
        ((checkpoint, tmp_path / "q.pte", tmp_path / "missing"), {}, "does not exist"),
        ((checkpoint, tmp_path / "q.pte", garbage), {}, "could be decoded"),
        ((checkpoint, tmp_path / "q.pte", []), {}, "no calibration images"),
        ((checkpoint, tmp_path / "q.pte", calibration), {"keep_fp32": tmp_path / "q.pte"}, "same file"),
        ((checkpoint, checkpoint, calibration), {}, "same file"),
    ]
    for args, options, words in cases:
        with pytest.raises(MobileNetError, match=words):
            quantize_pte(*args, **options)
    assert not (tmp_path / "q.pte").exists() and not (tmp_path / "q.pte.json").exists()


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobilenet quantize: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_quantize_cli_executorch_errors_need_no_executorch(untrained, tmp_path, capsys):
    checkpoint, calibration = str(untrained["checkpoint"]), str(untrained["calibration"])
    base = ["quantize", checkpoint, "--calibration", calibration, "--out", str(tmp_path / "q.pte")]
    cases = [
        (["--backend", "executorch", "--target", "arm"], "--target applies to --backend onnxruntime only"),
        (["--backend", "executorch", "--activations", "uint8"], "--activations"),
        (["--backend", "executorch", "--full-range"], "--full-range"),
        (["--backend", "executorch", "--method", "entropy"], "--method"),
        (["--backend", "executorch", "--max-batch", "0"], "from 1 to 1024"),
        (["--backend", "executorch", "--max-batch", "100000"], "from 1 to 1024"),
        (["--max-batch", "4"], "--max-batch applies to --backend executorch only"),
    ]
    for extra, words in cases:
        assert main([*base, *extra]) == 2
        assert words in _error(capsys)
    missing = ["quantize", str(tmp_path / "none.safetensors"), "--calibration", calibration, "--backend", "executorch"]
    assert main(missing) == 2 and "does not exist" in _error(capsys)
    assert not list(tmp_path.iterdir())


def test_quantize_cli_executorch_missing_names_the_extra(untrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)  # as if the mobile extra were not installed
    monkeypatch.setitem(sys.modules, "executorch.backends.xnnpack.quantizer.xnnpack_quantizer", None)
    argv = ["quantize", str(untrained["checkpoint"]), "--calibration", str(untrained["calibration"])]
    assert main([*argv, "--backend", "executorch", "--out", str(tmp_path / "q.pte")]) == 2
    assert "pip install executorch" in _error(capsys)
    assert not list(tmp_path.iterdir())
