"""Export: BatchNorm folding, ONNX (no BN node, one Clip per ReLU6, dynamic batch, metadata, ORT == PyTorch),
TorchScript, torch.export (.pt2), ExecuTorch (.pte, slow), and the CLI's errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mobilenet.cli import main
from mobilenet.errors import MobileNetError
from mobilenet.export import export_model, export_onnx, fold_batchnorm, read_onnx_metadata
from mobilenet.models import create_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# Small and fast on 2 shared cores: V2 at alpha 0.35 on 32x32 inputs (the whole V2 block structure, 52 convs).
NAME = "mobilenet_v2_0.35_96"
PREPROCESSING = {
    "input_size": 32,
    "resize_size": 32,
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.247, 0.2435, 0.2616],
    "interpolation": "bilinear",
    "style": "small",
}
CLASSES = [f"class{i}" for i in range(10)]


def _model(name: str = NAME, seed: int = 0) -> nn.Module:
    """A model whose BatchNorms are far from identity, so that a wrong fold changes the logits visibly."""
    torch.manual_seed(seed)
    model = create_model(name, resolution=32, small_input=True, num_classes=10)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0.0, 0.2, generator=generator)
    model.classifier.weight.data.normal_(0.0, 0.3, generator=generator)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _model()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = export_onnx(model, path, classes=CLASSES, preprocessing=PREPROCESSING)
    return path, result


def test_fold_batchnorm_keeps_logits_and_removes_bn(model):
    x = torch.randn(4, 3, 32, 32)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the input model must not be modified"
    with torch.no_grad():
        reference, got = model(x), folded(x)
    assert reference.abs().max() > 0.1  # the check below is meaningful only for non-trivial logits
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)


def test_fold_batchnorm_sequential_pair():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    seq[1].running_mean.normal_()
    seq[1].running_var.uniform_(0.5, 2)
    seq.eval()
    folded = fold_batchnorm(seq)
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(folded(x), seq(x), atol=1e-5, rtol=1e-5)


def test_onnx_graph_has_no_batchnorm_and_one_clip_per_relu6(model, onnx_file):
    path, result = onnx_file
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = [node.op_type for node in graph.graph.node]
    assert "BatchNormalization" not in ops
    relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    assert ops.count("Clip") == relu6 > 0
    assert "Relu" not in ops and "Min" not in ops and "Max" not in ops  # not decomposed into several nodes
    # Each Clip bounds to [0, 6]: its min/max inputs are constants (Constant nodes or initializers).
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    for node in graph.graph.node:
        if node.op_type == "Clip":
            assert float(constants[node.input[1]]) == 0.0 and float(constants[node.input[2]]) == 6.0
    assert "ONNX Runtime" in " ".join(result.checks) and result.max_abs_diff <= 1e-4


def test_onnx_dynamic_batch_names_and_logits(model, onnx_file):
    path, _ = onnx_file
    graph = onnx.load(str(path))
    (inp,), (out,) = graph.graph.input, graph.graph.output
    assert inp.name == "image" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        (got,) = session.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(got - expected).max() <= 1e-4


def test_onnx_metadata(model, onnx_file):
    path, _ = onnx_file
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["preprocessing"]) == PREPROCESSING
    assert json.loads(props["classes"]) == CLASSES
    assert json.loads(props["config"]) == model.config.to_dict()
    metadata = read_onnx_metadata(path)
    assert metadata["name"] == NAME and metadata["classes"] == CLASSES


def test_torchscript_and_pt2_round_trip(model, tmp_path):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    ts = export_model(model, tmp_path / "m.ts", format="torchscript", classes=CLASSES, preprocessing=PREPROCESSING)
    extra = {"mobilenet.json": ""}
    loaded = torch.jit.load(str(ts.path), _extra_files=extra)
    assert json.loads(extra["mobilenet.json"])["preprocessing"] == PREPROCESSING
    torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=0)

    pt2 = export_model(model, tmp_path / "m.pt2", format="pt2", classes=CLASSES, preprocessing=PREPROCESSING)
    extra = {"mobilenet.json": ""}
    program = torch.export.load(str(pt2.path), extra_files=extra)
    assert json.loads(extra["mobilenet.json"])["classes"] == CLASSES
    assert not any("batch_norm" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), expected, atol=1e-4, rtol=0)


def test_failed_verification_leaves_target_untouched(model, tmp_path):
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"previous file")
    with pytest.raises(MobileNetError, match="differ"):
        export_onnx(model, target, atol=1e-30)  # ORT's float arithmetic differs from PyTorch's in the last bits
    assert target.read_bytes() == b"previous file"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


@pytest.mark.slow
def test_executorch_pte_runs_in_its_runtime(tmp_path):
    """The phone runtime: ExecuTorch with the XNNPACK delegate, run in ExecuTorch's Python runtime (minutes on a
    busy 2-core machine, hence slow)."""
    pytest.importorskip("executorch")
    from mobilenet.export import pte_runner

    model = _model("mobilenet_v1_0.25_128")
    result = export_model(model, tmp_path / "m.pte", format="pte", classes=CLASSES, preprocessing=PREPROCESSING)
    assert json.loads(result.extra_files[0].read_text())["classes"] == CLASSES
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(pte_runner(result.path)(x), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_dynamo_exporter(model, tmp_path):
    pytest.importorskip("onnxscript")
    result = export_onnx(model, tmp_path / "d.onnx", exporter="dynamo")
    ops = [n.op_type for n in onnx.load(str(result.path)).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Clip") == sum(
        isinstance(m, nn.ReLU6) for m in model.modules()
    )


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    from mobilenet.checkpoint import save

    return save(model, tmp_path_factory.mktemp("ckpt") / "m.safetensors", classes=CLASSES, preprocessing=PREPROCESSING)


def test_cli_export_onnx(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert "ONNX Runtime" in capsys.readouterr().out
    assert read_onnx_metadata(out)["preprocessing"] == PREPROCESSING


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobilenet export: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_export_errors(checkpoint, tmp_path, capsys, monkeypatch):
    assert main(["export", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in _one_line_error(capsys)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[:-1000])
    assert main(["export", str(truncated), "--out", str(tmp_path / "t.onnx")]) == 2
    assert "truncated" in _one_line_error(capsys)

    # Another architecture: the weights of this V2 0.35 under the header of a V2 1.0.
    from safetensors.torch import load_file, save_file

    header = {"format_version": 1, "name": "x", "config": {**create_model("mobilenet_v2_1.0_96").config.to_dict()}}
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(checkpoint)), str(other), metadata={"mobilenet": json.dumps(header)})
    assert main(["export", str(other), "--out", str(tmp_path / "o.onnx")]) == 2
    assert "does not fit" in _one_line_error(capsys)

    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # as if the onnx extra were not installed
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "pip install onnx onnxruntime onnxscript" in _one_line_error(capsys)
    assert not (tmp_path / "x.onnx").exists()
