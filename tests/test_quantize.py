"""int8 post-training quantization (ONNX Runtime QDQ): a save -> quantize -> load -> evaluate round trip on real
images (scikit-learn's handwritten digits written as PNG files), metadata kept, and the CLI's errors."""

from __future__ import annotations

import json

import pytest

from conftest import trained_digits_checkpoint, write_images
from mobilenet.cli import main
from mobilenet.predict import Predictor

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

STEPS = 90  # training steps (~80% held-out accuracy; chance is 10%)
CALIBRATION = 128  # training images that calibrate the int8 model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    bundle, _model, _transform, checkpoint = trained_digits_checkpoint(root, STEPS)
    write_images(bundle.train, root / "calibration", range(CALIBRATION))
    files, labels = write_images(bundle.val, root / "val", range(200))  # held out from training and calibration
    return {"root": root, "checkpoint": checkpoint, "val": (files, labels), "classes": bundle.classes}


def _accuracy(predictor: Predictor, files, labels) -> tuple[float, list[int]]:
    predictions = predictor.predict(files, topk=1)
    assert all(p.ok for p in predictions)
    top1 = [p.index for p in predictions]
    return sum(int(a == b) for a, b in zip(top1, labels, strict=True)) / len(labels), top1


def test_quantize_save_load_evaluate_round_trip(setup, capsys):
    root, checkpoint = setup["root"], setup["checkpoint"]
    out = root / "digits.int8.onnx"
    code = main(["quantize", str(checkpoint), "--calibration", str(root / "calibration"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert f"calibrated on {CALIBRATION} image(s)" in capsys.readouterr().out

    # Load the int8 file back from disk, as a user would, and evaluate it on held-out images.
    files, labels = setup["val"]
    fp32_accuracy, fp32_top1 = _accuracy(Predictor(checkpoint), files, labels)
    int8 = Predictor(out)
    assert int8.backend_name == "onnxruntime"
    assert int8.classes == setup["classes"]
    int8_accuracy, int8_top1 = _accuracy(int8, files, labels)
    assert fp32_accuracy > 0.6  # the model classifies (chance is 0.1), so agreement below means something
    agreement = sum(int(a == b) for a, b in zip(fp32_top1, int8_top1, strict=True)) / len(files)
    assert agreement >= 0.9, (agreement, fp32_accuracy, int8_accuracy)
    assert int8_accuracy >= fp32_accuracy - 0.05

    import onnx

    graph = onnx.load(str(out))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantized (QDQ)
    int8_weights = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 52  # every conv weight of V2 (52 convs) is stored as int8
    props = {p.key: json.loads(p.value) for p in graph.metadata_props if p.key in ("preprocessing", "quantization")}
    assert props["preprocessing"] == Predictor(checkpoint).preprocessing
    assert props["quantization"]["weights"].endswith("per channel")
    # The default activation type is the one this CPU's int8 kernels take natively (uint8 on x86).
    from mobilenet.quantize import default_activation_type

    expected = default_activation_type()
    assert props["quantization"]["activations"] == expected
    activation_zero_points = {
        i.data_type
        for node in graph.graph.node
        if node.op_type == "QuantizeLinear" and len(node.input) > 2
        for i in graph.graph.initializer
        if i.name == node.input[2] and i.name not in {w.name for w in int8_weights}
    }
    type_of = {"uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}
    assert activation_zero_points == {type_of[expected]}, activation_zero_points


def test_default_activation_type_follows_the_cpu():
    from mobilenet.quantize import default_activation_type

    # x86's 8-bit multiplies are unsigned x signed; ARM's dot products signed x signed.
    assert default_activation_type("x86_64") == default_activation_type("AMD64") == "uint8"
    assert default_activation_type("aarch64") == default_activation_type("arm64") == "int8"


def test_quantize_per_tensor_api(setup):
    from mobilenet.quantize import quantize_onnx

    root = setup["root"]
    result = quantize_onnx(
        setup["checkpoint"],
        root / "pt.int8.onnx",
        root / "calibration",
        per_channel=False,
        num_calibration=64,
        activation_type="int8",
    )
    assert result.calibration_images == 64 and result.settings["weights"].endswith("per tensor")
    assert result.settings["activations"] == "int8"
    assert result.int8_agreement is not None and 0.0 <= result.int8_agreement <= 1.0
    (prediction,) = Predictor(result.path).predict(setup["val"][0][:1])
    assert prediction.ok


def test_quantize_cli_errors(setup, tmp_path, capsys):
    checkpoint = setup["checkpoint"]
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "a.jpg").write_text("not a jpeg")
    cases = [
        ([str(checkpoint), "--calibration", str(tmp_path / "missing")], "does not exist"),
        ([str(checkpoint), "--calibration", str(empty)], "no image files"),
        ([str(checkpoint), "--calibration", str(garbage), "--out", str(tmp_path / "g.onnx")], "could be decoded"),
        ([str(tmp_path / "none.safetensors"), "--calibration", str(empty)], "does not exist"),
    ]
    for argv, message in cases:
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mobilenet quantize: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "g.onnx").exists()


def test_target_sets_activations_and_weight_range(setup, tmp_path, capsys):
    """--target is the CPU that will run the model: ARM gets int8 activations and 8-bit weights, AVX2 7-bit weights
    (against int16 saturation), VNNI 8-bit; the default is this machine, and the output says which."""
    from mobilenet.export import read_onnx_metadata
    from mobilenet.quantize import TARGETS, this_machine_target

    assert this_machine_target("aarch64") == "arm"
    assert this_machine_target("x86_64", {"avx2", "fma"}) == "x86-avx2"
    assert this_machine_target("x86_64", {"avx2", "avx512_vnni"}) == "x86-vnni"
    assert this_machine_target("x86_64", {"avx_vnni"}) == "x86-vnni"
    calibration = str(setup["root"] / "calibration")
    for target, (activations, seven_bit) in TARGETS.items():
        out = tmp_path / f"{target}.onnx"
        argv = ["quantize", str(setup["checkpoint"]), "-c", calibration, "-n", "16", "--target", target, "-o", str(out)]
        assert main(argv) == 0
        assert f"target: {target} (as asked): {activations} activations" in capsys.readouterr().out
        settings = read_onnx_metadata(out)["quantization"]
        assert settings["activations"] == activations
        assert ("7-bit" in settings["weights"]) is seven_bit
    out = tmp_path / "here.onnx"
    assert main(["quantize", str(setup["checkpoint"]), "-c", calibration, "-n", "16", "-o", str(out)]) == 0
    assert f"target: {this_machine_target()} (this machine)" in capsys.readouterr().out


def test_quantized_file_with_a_flipped_weight_byte_is_refused_as_corrupt(setup, tmp_path):
    """The int8 file stores the digest of its own (int8) weights, not the fp32 export's it copies the metadata of:
    undamaged, it loads and its logits are ONNX Runtime's own; one flipped byte in a weight is refused when read."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from conftest import flip_onnx_weight_byte
    from mobilenet.errors import MobileNetError
    from mobilenet.export import ONNX_WEIGHTS_KEY, onnx_weights_digest, read_onnx_metadata
    from mobilenet.quantize import quantize_onnx

    out, fp32 = tmp_path / "q.int8.onnx", tmp_path / "q.fp32.onnx"
    quantize_onnx(setup["checkpoint"], out, setup["root"] / "calibration", num_calibration=16, keep_fp32=fp32)
    damaged = flip_onnx_weight_byte(out, tmp_path / "damaged.int8.onnx")
    for read in (read_onnx_metadata, Predictor):
        with pytest.raises(MobileNetError, match="is corrupt: its weights do not match the digest") as error:
            read(damaged)
        assert "damaged.int8.onnx" in str(error.value) and "\n" not in str(error.value)

    digests = [{p.key: p.value for p in onnx.load(str(f)).metadata_props}[ONNX_WEIGHTS_KEY] for f in (out, fp32)]
    assert digests[0] == onnx_weights_digest(onnx.load(str(out))) and digests[0] != digests[1]
    predictor = Predictor(out)
    size = predictor.preprocessing["input_size"]
    batch = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    np.testing.assert_allclose(predictor.logits(batch).numpy(), expected, rtol=0, atol=1e-5)
