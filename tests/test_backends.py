"""mobilenet.backends: the OpenVINO backends against PyTorch and ONNX Runtime, and the precision tiers they serve
(float32, bf16 where the CPU has it, int8 for a quantized .onnx); refusals name what would work."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_folder
from mobilenet import autotune, backends
from mobilenet.backends import BACKENDS, load_source, openvino_available
from mobilenet.errors import MobileNetError
from mobilenet.models import create_model
from mobilenet.predict import Predictor
from mobilenet.runtime import has_int8_dot, has_native_bf16

needs_openvino = pytest.mark.skipif(not openvino_available(), reason="needs the openvino extra (pip install openvino)")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_0.35_96", resolution=40, small_input=True, num_classes=7).eval()
    with torch.no_grad():  # logits of order 1-10 (random init gives ~1e-6), so a relative check means something
        model.classifier.weight.normal_(0, 4.0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def onnx_files(model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from mobilenet.export import export_onnx
    from mobilenet.quantize import quantize_onnx

    root = tmp_path_factory.mktemp("ov")
    fp32 = export_onnx(model, root / "m.onnx").path
    calibration = tiny_folder(root / "calibration", per_class=6, size=40)
    int8 = quantize_onnx(model, root / "m.int8.onnx", calibration).path
    return fp32, int8


def _batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 40, 40, generator=torch.Generator().manual_seed(n))


@needs_openvino
@pytest.mark.parametrize("n", [1, 3, 1])  # the batch size of 1 again: its compiled model is kept and reused
def test_openvino_equals_pytorch_at_each_batch_size(model, n):
    runner = BACKENDS["openvino"](load_source(model), num_threads=1)
    x = _batch(n)
    expected = model(x).detach()
    got = runner(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 + 1e-5 * expected.abs().max()
    assert runner.max_abs_diff is not None and runner.precision == "fp32"


@needs_openvino
def test_openvino_runs_the_fp32_and_int8_files_as_onnxruntime_does(onnx_files):
    fp32, int8 = onnx_files
    x = _batch(8)
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        source = load_source(path)
        ov, ort = BACKENDS["openvino"](source), BACKENDS["onnxruntime"](source)
        assert ov.precision == ort.precision == precision
        got, expected = ov(x), ort(x)
        if precision == "fp32":
            assert (got - expected).abs().max() <= 1e-4 + 1e-5 * expected.abs().max()
        else:  # two int8 engines round differently; the classes they pick agree
            assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75


@needs_openvino
@pytest.mark.skipif(not has_native_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX)")
def test_bf16_is_close_to_float32_and_says_its_precision(model):
    predictor = Predictor(model, precision="bf16", batch_size=4)
    assert predictor.backend_name == "openvino-bf16" and predictor.precision == "bf16"
    x = _batch(4)
    expected = model(x).detach()
    got = predictor.logits(x)
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()
    assert (got - expected).abs().max() > 0  # rounded to bf16: not float32 under another name


@needs_openvino
def test_bf16_on_a_cpu_without_it_is_refused(model, monkeypatch):
    monkeypatch.setattr(backends, "has_native_bf16", lambda: False)
    monkeypatch.setattr(autotune, "has_native_bf16", lambda: False)
    with pytest.raises(MobileNetError, match="bf16 needs a CPU with AVX512-BF16 or AMX"):
        Predictor(model, precision="bf16")
    with pytest.raises(MobileNetError, match="AVX512-BF16 or AMX"):
        BACKENDS["openvino-bf16"](load_source(model))
    assert autotune.tier_candidates("auto-fast", load_source(model)) == [
        name for name in autotune.PRECISION_CANDIDATES["fp32"] if backends.backend_installed(name)
    ]  # auto-fast without bf16 hardware is float32's candidates only


def _no_int8_dot(monkeypatch):
    monkeypatch.setattr(autotune, "has_int8_dot", lambda: False)


def test_precision_refusals_name_what_would_work(model, onnx_files, monkeypatch):
    _no_int8_dot(monkeypatch)  # where no backend quantizes a float model as it runs
    with pytest.raises(MobileNetError, match="mobilenet quantize CHECKPOINT --calibration DIR"):
        Predictor(model, precision="int8")
    with pytest.raises(MobileNetError, match="unknown precision 'fp16'; expected one of fp32, bf16, int8, auto-fast"):
        Predictor(model, precision="fp16")
    _fp32, int8 = onnx_files
    with pytest.raises(MobileNetError, match="is already int8; precision fp32 needs the float model"):
        Predictor(int8, precision="fp32")
    with pytest.raises(MobileNetError, match="backend onnxruntime runs this model in fp32, not bf16; use backend auto"):
        Predictor(model, backend="onnxruntime", precision="bf16")
    with pytest.raises(MobileNetError, match="precision int8 runs an int8 model"):
        Predictor(_fp32, precision="int8")


def test_an_int8_file_runs_in_int8_with_the_tier_left_out_or_asked_for(onnx_files):
    _fp32, int8 = onnx_files
    for precision in (None, "int8", "auto-fast"):
        predictor = Predictor(int8, precision=precision)
        assert predictor.precision == "int8" and predictor.backend_name in autotune.FILE_BACKENDS


def test_openvino_missing_is_said_with_the_install_command(model, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'", name="openvino")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(MobileNetError, match=r"pip install -e '\.\[openvino\]'"):
        BACKENDS["openvino"](load_source(model))


@needs_openvino
def test_openvino_refuses_a_gpu_device(model):
    with pytest.raises(MobileNetError, match="runs on the CPU"):
        BACKENDS["openvino"](load_source(model), device="cuda")


@pytest.mark.parametrize("bad", [3, ["bf16"], "", "FP32", None.__class__])
def test_a_precision_of_the_wrong_type_or_spelling_is_refused(model, bad):
    with pytest.raises(MobileNetError, match="unknown precision"):
        Predictor(model, precision=bad)


def test_cli_precision_mistakes_exit_2_without_a_traceback(model, tmp_path, capsys, monkeypatch):
    from mobilenet.checkpoint import save
    from mobilenet.cli import main

    checkpoint = save(model, tmp_path / "m.safetensors")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 40)).save(image)
    _no_int8_dot(monkeypatch)
    assert main(["predict", str(checkpoint), str(image), "--precision", "int8"]) == 2
    assert "mobilenet quantize" in capsys.readouterr().err
    monkeypatch.setattr(backends, "has_native_bf16", lambda: False)
    monkeypatch.setattr(autotune, "has_native_bf16", lambda: False)
    assert main(["predict", str(checkpoint), str(image), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "AVX512-BF16 or AMX" in err and "Traceback" not in err
    assert main(["select", "--latency-ms", "5", "--precision", "bf16", "--family", "v1"]) == 2
    assert "AVX512-BF16 or AMX" in capsys.readouterr().err


@pytest.mark.parametrize("measure", ["0", "1"])
def test_an_onnx_file_with_a_broken_graph_is_refused_by_every_runtime(
    onnx_files, tmp_path, monkeypatch, capsys, measure
):
    """Valid metadata, an operator no runtime knows: a one-line error (exit 2), whichever runtime tries."""
    import onnx
    from PIL import Image

    from mobilenet.cli import main

    graph = onnx.load(str(onnx_files[0]))
    graph.graph.node[3].op_type = "NoSuchOp"
    broken = tmp_path / "broken.onnx"
    onnx.save(graph, str(broken))
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    monkeypatch.setenv("MOBILENET_AUTO_MEASURE", measure)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for backend in ("auto", "onnxruntime", *(["openvino"] if openvino_available() else [])):
        assert main(["predict", str(broken), str(tmp_path / "a.png"), "--backend", backend]) == 2
        err = capsys.readouterr().err
        assert "broken.onnx" in err and "Traceback" not in err, backend


needs_fused_int8 = pytest.mark.skipif(
    not (backends.fused_available() and has_int8_dot()),
    reason="needs the fused C extension (python setup.py build_ext --inplace) and a CPU with VNNI or ARM dot products",
)


@needs_fused_int8
def test_a_float_model_runs_in_int8_in_the_fused_kernel_without_calibration(model):
    predictor = Predictor(model, precision="int8", batch_size=8)
    assert predictor.backend_name == "fused-int8" and predictor.precision == "int8"
    assert autotune.tier_candidates("int8", load_source(model)) == ["fused-int8"]
    x = _batch(8)
    expected = model(x).detach()
    got = predictor.logits(x)
    # Reference: the eager float32 model. int8 rounds, so close but not equal; the classes mostly agree.
    assert (got - expected).norm() <= 0.1 * expected.norm()
    assert (got - expected).abs().max() > 0
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75
    assert Predictor(model, backend="fused-int8").precision == "int8"


@needs_fused_int8
def test_the_fused_int8_backend_refuses_a_model_it_computes_wrongly(model, monkeypatch):
    from mobilenet import fused

    real_call = fused.FusedNetwork.__call__
    monkeypatch.setattr(fused.FusedNetwork, "__call__", lambda self, x: real_call(self, x).flip(1))  # classes swapped
    with pytest.raises(
        MobileNetError, match=r"fused-int8: the int8 logits differ from float32's by .*use precision fp32"
    ):
        BACKENDS["fused-int8"](load_source(model))


@needs_fused_int8
def test_the_fused_int8_backend_refuses_files_and_other_devices(model, onnx_files):
    fp32, _int8 = onnx_files
    with pytest.raises(MobileNetError, match="the fused-int8 backend runs a PyTorch MobileNet"):
        BACKENDS["fused-int8"](load_source(fp32))
    with pytest.raises(MobileNetError, match="fused-int8 backend runs on the CPU"):
        BACKENDS["fused-int8"](load_source(model), device="cuda")
    assert "fused-int8" not in autotune.tier_candidates("int8", load_source(_int8))


def _with_nan_classifier(model):
    torch.nn.init.constant_(model.classifier.weight, float("nan"))
    return model


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.double(), "torch.float64; expected float32 weights"),  # was a dtype mismatch on the first batch
        (lambda m: m.half(), "torch.float16; expected float32 weights"),
        (lambda m: m.to("meta"), "meta device"),  # was NotImplementedError
        (lambda m: _with_nan_classifier(m), "NaN or infinite"),
    ],
    ids=["float64", "float16", "meta", "nan"],
)
def test_a_model_whose_weights_no_backend_runs_is_refused(change, words):
    model = change(create_model("mobilenet_v1_0.25_128", resolution=32, small_input=True, num_classes=3))
    for backend in ("torch", "fused"):
        with pytest.raises(MobileNetError, match=words):
            Predictor(model, backend=backend)
