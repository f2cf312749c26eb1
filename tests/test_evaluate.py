"""Evaluation numbers against scikit-learn, and the eval/train/demo CLIs' error handling (exit 2, one line)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.io import encode_png

from mobilenet.checkpoint import save
from mobilenet.cli import main
from mobilenet.data import build_eval_transform, load_data
from mobilenet.errors import MobileNetError
from mobilenet.evaluate import _matching_classes, evaluate_checkpoint
from mobilenet.models import create_model


def folder(root: Path, classes=("a", "b", "c", "d", "e", "f"), per_class: int = 3) -> Path:
    g = torch.Generator().manual_seed(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
            (root / name / f"{i}.png").write_bytes(bytes(encode_png(image).numpy()))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = folder(root / "data" / "train")
    folder(root / "data" / "val")
    torch.manual_seed(0)
    model = create_model("mobilenet_v1_0.25_128", resolution=32, small_input=True, num_classes=6).eval()
    with torch.no_grad():  # a non-trivial classifier so predictions vary across classes
        model.classifier.weight.normal_(0, 1.0)
    bundle = load_data(root / "data")
    preprocessing = bundle.preprocessing(32)
    checkpoint = save(model, root / "model.safetensors", classes=bundle.classes, preprocessing=preprocessing)
    return root, data.parent, checkpoint, model, preprocessing


def test_metrics_match_sklearn(setup):
    from sklearn.metrics import confusion_matrix, top_k_accuracy_score

    _root, data, checkpoint, model, preprocessing = setup
    result = evaluate_checkpoint(checkpoint, data, batch_size=5, progress=False)
    bundle = load_data(data)
    transform = build_eval_transform(preprocessing)
    images = torch.stack([transform(bundle.val[i][0]) for i in range(len(bundle.val))])
    labels = [bundle.val[i][1] for i in range(len(bundle.val))]
    with torch.no_grad():
        logits = model(images)
    predicted = logits.argmax(1).tolist()
    # Independent reference: scikit-learn's confusion_matrix and top_k_accuracy_score.
    assert result["confusion"] == confusion_matrix(labels, predicted, labels=list(range(6))).tolist()
    assert result["top1"] == pytest.approx(sum(p == t for p, t in zip(predicted, labels, strict=True)) / len(labels))
    assert result["top5"] == pytest.approx(top_k_accuracy_score(labels, logits.numpy(), k=5, labels=list(range(6))))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(labels))), 1e-5)
    assert set(result["per_class"]) == set(bundle.classes) and result["images"] == 18


def test_eval_cli_json_and_plot(setup, capsys):
    root, data, checkpoint, _, _ = setup
    plot = root / "confusion.png"
    assert main(["eval", str(checkpoint), "--data", str(data), "--format", "json", "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "per_class", "confusion", "confusion_plot"} <= set(result)
    assert plot.stat().st_size > 1000


def test_eval_rejects_other_classes(setup, tmp_path, capsys):
    _, _, checkpoint, _, _ = setup
    other = folder(tmp_path / "other", classes=("a", "b", "c", "d", "e", "zebra"))
    with pytest.raises(MobileNetError, match=r"missing f.*extra zebra"):
        evaluate_checkpoint(checkpoint, other, progress=False)
    assert main(["eval", str(checkpoint), "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilenet eval: error:") and len(err.strip().splitlines()) == 1


def test_a_class_mismatch_of_thousands_of_names_is_a_readable_line():
    """A model of 1,500 classes against a folder of 3: the message names the first of each list and counts the
    rest, instead of printing every name (a 10 KB line)."""
    classes = [f"class{index:04d}" for index in range(1500)]
    source = SimpleNamespace(classes=classes, config=SimpleNamespace(num_classes=1500))
    with pytest.raises(MobileNetError) as raised:
        _matching_classes(source, ["class0000", "class0001", "zebra"], "m.safetensors", "DIR")
    message = str(raised.value)
    assert "missing class0002, class0003" in message and "and 1,478 more" in message  # 1,498 missing, 20 shown
    assert "extra zebra" in message and "expected: class0000" in message and "and 1,480 more" in message
    assert len(message) < 1000 and "class1499" not in message


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--model", "mobilenet_v1_0.25_128", "--data", "/nonexistent/dir", "--out", "OUT"], "not found"),
        (
            ["train", "--model", "mobilenet_v1_0.25_128", "--data", "digits", "--out", "OUT", "--batch-size", "0"],
            "batch",
        ),
        (["train", "--model", "mobilenet_v1_0.25_128", "--data", "digits", "--out", "OUT", "--lr", "-1"], "--lr"),
        (["train", "--model", "mobilenet_v9", "--data", "digits", "--out", "OUT"], "mobilenet_v9"),
        (["eval", "/nonexistent.safetensors", "--data", "digits"], "does not exist"),
        (["demo", "--epochs", "0"], "--epochs"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, needle, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_train_cli_runs_and_writes_a_run(setup, tmp_path, capsys):
    _, data, _, _, _ = setup
    out = tmp_path / "run"
    argv = ["train", "--model", "mobilenet_v1_0.25_128", "--data", str(data), "--out", str(out), "--epochs", "1"]
    argv += ["--batch-size", "6", "--resolution", "32", "--num-workers", "0", "--no-progress", "--recipe", "paper"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["optimizer"] == "rmsprop" and config["train_config"]["batch_size"] == 6
    assert (out / "best.safetensors").exists() and (out / "metrics.csv").exists()
    assert "epoch 1/1" in capsys.readouterr().out


def test_every_train_config_field_has_a_cli_option():
    from dataclasses import fields

    from mobilenet.cli import build_parser
    from mobilenet.train import TrainConfig

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--threads", "1"])
    missing = [f.name for f in fields(TrainConfig) if not hasattr(args, f.name)]
    assert missing == []
    assert args.threads == 1 and args.hflip is None and args.batch_augment is True  # None: on, but off for the digits


@pytest.mark.parametrize("backend", ["torch-jit", "auto"])
def test_fast_backends_evaluate_alike(setup, backend):
    _root, data, checkpoint, _model, _preprocessing = setup
    reference = evaluate_checkpoint(checkpoint, data, batch_size=5, progress=False, device="cpu")
    fast = evaluate_checkpoint(checkpoint, data, batch_size=5, progress=False, device="cpu", backend=backend)
    assert reference["backend"] == "torch" and fast["backend"] == backend
    assert fast["confusion"] == reference["confusion"] and fast["top5"] == reference["top5"]
    assert fast["loss"] == pytest.approx(reference["loss"], abs=1e-4)


def test_every_written_format_is_read_back_with_the_same_predictions(setup, tmp_path):
    """eval and predict take every file export/quantize write (.ts, .pt2, .onnx fp32 and int8), reading classes and
    preprocessing from its metadata: the fp32 formats give the same predictions as the PyTorch model, and eval of the
    int8 file reports its difference from the fp32 checkpoint."""
    pytest.importorskip("onnxruntime")
    from mobilenet.checkpoint import load
    from mobilenet.export import EXPORT_FORMATS, export_model
    from mobilenet.predict import Predictor
    from mobilenet.quantize import quantize_onnx

    _root, data, checkpoint, _model, _preprocessing = setup
    reference = evaluate_checkpoint(checkpoint, data, batch_size=6, progress=False)
    images = sorted((data / "val").rglob("*.png"))
    expected = [p.index for p in Predictor(checkpoint, backend="torch").predict(images, topk=1)]
    for fmt in ("onnx", "torchscript", "pt2"):
        exported = export_model(load(checkpoint), tmp_path / f"m{EXPORT_FORMATS[fmt]}", format=fmt).path
        result = evaluate_checkpoint(exported, data, batch_size=6, progress=False)
        assert result["confusion"] == reference["confusion"], fmt
        assert result["classes"] == reference["classes"], fmt
        predictor = Predictor(exported)
        assert predictor.classes == reference["classes"]
        assert [p.index for p in predictor.predict(images, topk=1)] == expected, fmt
    int8 = quantize_onnx(checkpoint, tmp_path / "m.int8.onnx", data / "train").path
    result = evaluate_checkpoint(int8, data, batch_size=6, progress=False, reference=checkpoint)
    assert result["reference"]["top1"] == reference["top1"]
    assert result["top1_difference"] == pytest.approx(result["top1"] - reference["top1"])
    assert result["backend_used"] == "onnxruntime"


def test_a_tflite_export_is_read_back_with_the_same_predictions(setup, tmp_path):
    """eval and predict take a LiteRT .tflite (batch 1: run image by image), reading classes and preprocessing from
    its sidecar: the same confusion matrix and top-1 as the PyTorch model."""
    reason = "LiteRT is an optional extra (pip install -e '.[litert]')"
    pytest.importorskip("litert_torch", reason=reason)
    pytest.importorskip("ai_edge_litert.interpreter", reason=reason)
    from mobilenet.checkpoint import load
    from mobilenet.export import export_model
    from mobilenet.predict import Predictor

    _root, data, checkpoint, _model, _preprocessing = setup
    reference = evaluate_checkpoint(checkpoint, data, batch_size=6, progress=False)
    images = sorted((data / "val").rglob("*.png"))
    expected = [p.index for p in Predictor(checkpoint, backend="torch").predict(images, topk=1)]
    exported = export_model(load(checkpoint), tmp_path / "m.tflite", format="litert").path
    result = evaluate_checkpoint(exported, data, batch_size=6, progress=False)
    assert result["confusion"] == reference["confusion"] and result["top1"] == reference["top1"]
    assert result["classes"] == reference["classes"]
    predictor = Predictor(exported)
    assert predictor.classes == reference["classes"]
    assert [p.index for p in predictor.predict(images, topk=1)] == expected


def test_cli_eval_of_an_int8_onnx_prints_the_difference(setup, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from mobilenet.quantize import quantize_onnx

    _root, data, checkpoint, _model, _preprocessing = setup
    int8 = quantize_onnx(checkpoint, tmp_path / "m.int8.onnx", data / "train").path
    code = main(["eval", str(int8), "--data", str(data), "--reference", str(checkpoint), "--no-plot"])
    out = capsys.readouterr().out
    assert code == 0
    assert "reference" in out and "points" in out


def test_an_export_under_another_name_is_named_for_what_it_is(setup, tmp_path):
    """A .ts or .pt2 archive given under another suffix is recognised from its entries, and the message says to
    give it its suffix (not to convert it, which is for torchvision/timm files)."""
    from mobilenet.backends import load_source
    from mobilenet.checkpoint import load
    from mobilenet.export import export_model

    _root, _data, checkpoint, _model, _preprocessing = setup
    for fmt, suffix in (("torchscript", ".ts"), ("pt2", ".pt2")):
        exported = export_model(load(checkpoint), tmp_path / f"m{suffix}", format=fmt).path
        renamed = exported.rename(tmp_path / f"m-{fmt}.bin")
        with pytest.raises(MobileNetError, match=rf"name it with the \{suffix} suffix") as info:
            load_source(renamed)
        assert "convert" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("m.ts", b"not a torchscript archive", "not a readable .ts export"),
        ("m.pt2", b"PK\x03\x04 truncated zip", "not a readable .pt2 export"),
        ("m.pte", b"\x00" * 64, "no metadata beside it"),
        ("m.tflite", b"\x00" * 64, "no metadata beside it"),
        ("m.ts", b"", "not a readable .ts export"),
    ],
)
def test_broken_exports_are_one_line_errors(setup, tmp_path, capsys, name, content, words):
    """A corrupt, empty or sidecar-less export given to eval or predict: exit 2, one line naming the file."""
    _root, data, _checkpoint, _model, _preprocessing = setup
    path = tmp_path / name
    path.write_bytes(content)
    for argv in (["eval", str(path), "--data", str(data), "--no-plot"], ["predict", str(path), str(data)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and str(path) in err and "\n" not in err and "Traceback" not in err, err
    assert path.read_bytes() == content


def test_eval_reference_that_does_not_exist_is_refused(setup, capsys):
    _root, data, checkpoint, _model, _preprocessing = setup
    assert main(["eval", str(checkpoint), "--data", str(data), "--reference", "missing.safetensors", "--no-plot"]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err


def test_eval_int8_of_a_checkpoint_quantizes_compares_and_keeps_the_bound(setup, capsys):
    """`eval --precision int8 --calibration DIR` of a float checkpoint: quantized for this machine, evaluated, and
    compared with the checkpoint in float32 on the same images."""
    pytest.importorskip("onnxruntime")
    _root, data, checkpoint, _model, _preprocessing = setup
    args = ["eval", str(checkpoint), "--data", str(data), "--no-plot", "--precision", "int8"]
    code = main([*args, "--calibration", str(data / "train"), "--max-drop", "100", "--format", "json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["precision"] == "int8" and result["precision_bound"] == 1.0
    assert result["reference"]["top1"] == evaluate_checkpoint(checkpoint, data, progress=False)["top1"]
    assert result["precision_check"] == "within bound"


def test_eval_int8_of_a_checkpoint_without_calibration_runs_the_fused_kernels_int8(setup, capsys):
    """Where our fused kernel runs int8 (built, CPU with VNNI), `eval --precision int8` of a float checkpoint needs
    no calibration: the kernel quantizes as it runs, compared with the checkpoint in float32 on the same images."""
    from mobilenet.backends import fused_available
    from mobilenet.runtime import has_int8_dot

    if not (fused_available() and has_int8_dot()):
        pytest.skip("needs the fused C extension and a CPU with VNNI or ARM dot products")
    _root, data, checkpoint, _model, _preprocessing = setup
    args = ["eval", str(checkpoint), "--data", str(data), "--no-plot", "--precision", "int8", "--format", "json"]
    code = main([*args, "--max-drop", "100"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["precision"] == "int8" and result["backend_used"] == "fused-int8"
    assert result["reference"]["top1"] == evaluate_checkpoint(checkpoint, data, progress=False)["top1"]
    assert result["precision_check"] == "within bound"


def test_eval_calibration_of_an_onnx_file_is_refused(tmp_path, capsys):
    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"not read")
    code = main(["eval", str(model_file), "--data", str(tmp_path), "--precision", "int8", "--calibration", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "is an .onnx file already" in err and "Traceback" not in err


def test_a_precision_that_loses_more_than_its_bound_is_refused_with_the_figure(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from mobilenet import evaluate
    from mobilenet.quantize import quantize_onnx

    classes = ("a", "b", "c", "d", "e", "f")
    folder(tmp_path / "data" / "train", classes)
    folder(tmp_path / "data" / "val", classes[:1], per_class=5)  # five images of "a", one of each other class
    folder(tmp_path / "data" / "val", classes[1:], per_class=1)
    torch.manual_seed(0)
    model = create_model("mobilenet_v1_0.25_128", resolution=32, small_input=True, num_classes=6).eval()
    with torch.no_grad():
        model.classifier.bias[0] = 100.0  # float32 says "a" to everything: top-1 5/10
    bundle = load_data(tmp_path / "data")
    checkpoint = save(model, tmp_path / "m.safetensors", classes=bundle.classes, preprocessing=bundle.preprocessing(32))
    int8 = quantize_onnx(checkpoint, tmp_path / "m.int8.onnx", tmp_path / "data" / "train").path
    honest = evaluate_checkpoint(int8, tmp_path / "data", progress=False, reference=checkpoint)
    assert honest["top1"] == honest["reference"]["top1"] == 0.5 and honest["precision_check"] == "within bound"
    # An int8 engine gone wrong: it says "f" to everything (top-1 1/10), 40 points below float32.
    monkeypatch.setattr(evaluate.Predictor, "logits", lambda self, batch: torch.eye(6)[[5] * len(batch)])
    with pytest.raises(
        evaluate.AccuracyBoundError, match=r"int8 top-1 10\.00% is 40\.00 points below float32's 50\.00%"
    ):
        evaluate_checkpoint(int8, tmp_path / "data", progress=False, reference=checkpoint)
    loose = evaluate_checkpoint(int8, tmp_path / "data", progress=False, reference=checkpoint, max_drop=0.5)
    assert loose["precision_check"] == "within bound" and loose["precision_bound"] == 0.5
    alone = evaluate_checkpoint(int8, tmp_path / "data", progress=False)  # no float32 reference: said, not checked
    assert alone["precision_check"].startswith("unchecked")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precision", "int8"], "mobilenet quantize CHECKPOINT --calibration DIR"),
        (["--calibration", "x"], "give --precision int8 too"),
        (["--precision", "bf16", "--max-drop", "150"], "--max-drop is in percentage points from 0 to 100"),
        (["--precision", "int8", "--calibration", "/nonexistent/dir"], "/nonexistent/dir"),
    ],
)
def test_cli_eval_precision_mistakes_exit_2(setup, capsys, monkeypatch, extra, message):
    from mobilenet import autotune

    monkeypatch.setattr(autotune, "has_int8_dot", lambda: False)  # no backend quantizes as it runs here
    _root, data, checkpoint, _model, _preprocessing = setup
    code = main(["eval", str(checkpoint), "--data", str(data), "--no-plot", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_max_drop_of_the_wrong_type_is_refused(setup):
    _root, data, checkpoint, _model, _preprocessing = setup
    for bad in (-0.1, 2.0, "0.3", True):
        with pytest.raises(MobileNetError, match="max_drop must be a fraction"):
            evaluate_checkpoint(checkpoint, data, progress=False, max_drop=bad)


@pytest.mark.parametrize(("backend", "precision"), [("fused", "fp32"), ("fused-int8", "int8")])
def test_cli_eval_runs_our_fused_kernel_by_name(setup, capsys, backend, precision):
    from mobilenet.backends import fused_available

    if not fused_available():
        pytest.skip("needs the fused C extension (python setup.py build_ext --inplace)")
    _root, data, checkpoint, _model, _preprocessing = setup
    args = ["eval", str(checkpoint), "--data", str(data), "--no-plot", "--backend", backend, "--format", "json"]
    code = main(args)
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["backend_used"] == backend and result["precision"] == precision
    eager = evaluate_checkpoint(checkpoint, data, progress=False)["top1"]
    if precision == "fp32":  # the same logits within 1e-4: the same classes
        assert result["top1"] == eager
    else:
        assert abs(result["top1"] - eager) <= 0.2
