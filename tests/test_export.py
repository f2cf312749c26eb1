"""Export: BatchNorm folding, ONNX (no BN node, one Clip per ReLU6, dynamic batch, metadata, ORT == PyTorch),
TorchScript, torch.export (.pt2), ExecuTorch (.pte, slow), and the CLI's errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SMALL_PREPROCESSING, busy_batchnorm_model
from mobilenet.cli import main
from mobilenet.errors import MobileNetError
from mobilenet.export import export_model, export_onnx, fold_batchnorm, read_onnx_metadata
from mobilenet.models import create_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# Small and fast on 2 shared cores: V2 at alpha 0.35 on 32x32 inputs (the whole V2 block structure, 52 convs).
NAME = "mobilenet_v2_0.35_96"
PREPROCESSING = SMALL_PREPROCESSING
CLASSES = [f"class{i}" for i in range(10)]


def _model(name: str = NAME, seed: int = 0) -> nn.Module:
    return busy_batchnorm_model(name, seed=seed)


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


def test_onnx_metadata_nested_too_deeply_is_corrupt_metadata(onnx_file, tmp_path):
    from mobilenet.errors import MobileNetError

    path, _ = onnx_file
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "mobilenet":
            prop.value = "[" * 100_000 + "]" * 100_000  # the JSON parser would raise RecursionError
    deep = tmp_path / "deep.onnx"
    onnx.save(proto, str(deep))
    with pytest.raises(MobileNetError, match=r"corrupt mobilenet metadata \(nested too deeply"):
        read_onnx_metadata(deep)


def _props(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _with_props(source, target, edit) -> object:
    """Copy an .onnx file (parsed, not its weights' bytes) with its metadata_props (a dict) edited."""
    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    edit(props)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(target))
    return target


def test_onnx_stores_a_weights_digest_beside_the_unchanged_metadata(onnx_file):
    from mobilenet.export import ONNX_WEIGHTS_KEY, onnx_weights_digest

    path, _ = onnx_file
    props = _props(path)
    assert re.fullmatch(r"[0-9a-f]{64}", props[ONNX_WEIGHTS_KEY])
    assert props[ONNX_WEIGHTS_KEY] == onnx_weights_digest(onnx.load(str(path)))
    assert ONNX_WEIGHTS_KEY not in json.loads(props["mobilenet"])  # the JSON readers know is as it was
    assert read_onnx_metadata(path) == json.loads(props["mobilenet"])


def test_onnx_with_a_flipped_weight_byte_is_refused_as_corrupt(onnx_file, tmp_path):
    """One flipped byte in an initializer loaded and ran (protobuf has no checksum); it is refused when read, by
    the Predictor too, and the undamaged file's logits are ONNX Runtime's own."""
    from conftest import flip_onnx_weight_byte
    from mobilenet.predict import Predictor

    path, _ = onnx_file
    damaged = flip_onnx_weight_byte(path, tmp_path / "damaged.onnx")
    for read in (read_onnx_metadata, Predictor):
        with pytest.raises(MobileNetError, match="is corrupt: its weights do not match the digest") as error:
            read(damaged)
        assert "damaged.onnx" in str(error.value) and "\n" not in str(error.value)
    batch = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32))
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": batch.numpy()})
    got = Predictor(path, backend="onnxruntime").logits(batch).numpy()
    np.testing.assert_allclose(got, expected[0], rtol=0, atol=1e-5)


def test_onnx_without_the_digest_key_loads_unchecked(onnx_file, tmp_path):
    """A file from an older version or another tool has no digest: it loads as before, damaged or not."""
    from conftest import flip_onnx_weight_byte
    from mobilenet.export import ONNX_WEIGHTS_KEY
    from mobilenet.predict import Predictor

    path, _ = onnx_file
    damaged = flip_onnx_weight_byte(path, tmp_path / "damaged.onnx")
    for source in (path, damaged):
        older = _with_props(source, tmp_path / f"older-{source.name}", lambda props: props.pop(ONNX_WEIGHTS_KEY))
        assert read_onnx_metadata(older)["classes"] == CLASSES
        assert Predictor(older).num_classes == len(CLASSES)


def test_onnx_whose_digest_was_edited_is_refused(onnx_file, tmp_path):
    import hashlib

    from mobilenet.export import ONNX_WEIGHTS_KEY

    path, _ = onnx_file
    other = hashlib.sha256(b"another model").hexdigest()
    for value in (other, other.upper(), "", "not hex"):
        edited = _with_props(path, tmp_path / "edited.onnx", lambda props, v=value: props.update({ONNX_WEIGHTS_KEY: v}))
        with pytest.raises(MobileNetError, match=r"edited\.onnx is corrupt"):
            read_onnx_metadata(edited)


def test_onnx_weights_digest_does_not_depend_on_how_a_tensor_is_stored(onnx_file, tmp_path):
    """The same values as raw_data or float_data give the same digest (a tool that re-saves a file may store
    them either way); another value does not."""
    from mobilenet.export import onnx_weights_digest

    path, _ = onnx_file
    proto = onnx.load(str(path))
    before = onnx_weights_digest(proto)
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(tensor).copy()
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values.reshape(-1).tolist())
    assert not tensor.HasField("raw_data")
    assert onnx_weights_digest(proto) == before
    resaved = tmp_path / "float_data.onnx"
    onnx.save(proto, str(resaved))
    assert read_onnx_metadata(resaved)["classes"] == CLASSES  # the reader agrees
    tensor.float_data[len(values.reshape(-1)) // 2] += 1.0
    assert onnx_weights_digest(proto) != before


def test_onnx_weights_digest_covers_the_constant_nodes(onnx_file, tmp_path):
    """torch.onnx writes ReLU6's bounds as Constant nodes: an edited bound (6 -> 7) is refused like a weight."""
    path, _ = onnx_file
    proto = onnx.load(str(path))
    six = np.array(6.0, dtype=np.float32)
    bounds = [
        node.attribute[0].t
        for node in proto.graph.node
        if node.op_type == "Constant" and np.array_equal(onnx.numpy_helper.to_array(node.attribute[0].t), six)
    ]
    assert bounds, "expected ReLU6's upper bound as a Constant node"
    bounds[0].CopyFrom(onnx.numpy_helper.from_array(np.array(7.0, dtype=np.float32), bounds[0].name))
    edited = tmp_path / "seven.onnx"
    onnx.save(proto, str(edited))
    with pytest.raises(MobileNetError, match=r"seven\.onnx is corrupt"):
        read_onnx_metadata(edited)


def test_a_runtime_files_metadata_nested_too_deeply_is_no_metadata(tmp_path):
    from mobilenet.errors import MobileNetError
    from mobilenet.export import _metadata_text

    with pytest.raises(MobileNetError, match="has no mobilenet metadata"):
        _metadata_text(tmp_path / "m.tflite", "[" * 100_000 + "]" * 100_000)


def test_a_runtime_files_metadata_sidecar_over_its_limit_is_refused_unread(tmp_path):
    from mobilenet.errors import MobileNetError
    from mobilenet.export import SIDECAR_MAX_BYTES, _sidecar_metadata

    program = tmp_path / "m.tflite"
    program.write_bytes(b"")
    with open(tmp_path / "m.tflite.json", "wb") as handle:  # sparse: over the limit without writing it
        handle.truncate(SIDECAR_MAX_BYTES + 1)
    with pytest.raises(MobileNetError, match=r"metadata file .*m\.tflite\.json holds .* over its"):
        _sidecar_metadata(program)


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


# ExecuTorch: a dynamic batch above the 15 that torch's conv heuristics used to cap it at, and our runner's checks.
PTE_BOUND = 40


@pytest.fixture(scope="module")
def pte_file(model, tmp_path_factory):
    pytest.importorskip("executorch", reason="ExecuTorch is an optional extra (pip install -e '.[mobile]')")
    path = tmp_path_factory.mktemp("pte") / "m.pte"
    result = export_model(model, path, format="pte", classes=CLASSES, preprocessing=PREPROCESSING, max_batch=PTE_BOUND)
    return path, result


@pytest.mark.parametrize("batch", [1, 2, PTE_BOUND])
def test_pte_equals_pytorch_at_batch_1_2_and_its_bound(model, pte_file, batch):
    from mobilenet.export import pte_runner

    runner = pte_runner(pte_file[0])
    assert runner.max_batch == PTE_BOUND and runner.input_shape == (PTE_BOUND, 3, 32, 32)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(runner(x), expected, atol=1e-4, rtol=1e-5)


def test_pte_sidecar_says_bound_and_precision(pte_file):
    path, result = pte_file
    metadata = json.loads((path.parent / "m.pte.json").read_text())
    assert result.extra_files == [path.parent / "m.pte.json"]
    assert metadata["input"]["max_batch"] == PTE_BOUND and metadata["precision"] == "float32"
    assert metadata["classes"] == CLASSES and metadata["preprocessing"] == PREPROCESSING
    assert any(f"batch 1, 2, {PTE_BOUND}" in check for check in result.checks)


def test_pte_runner_refuses_a_batch_above_its_bound_and_bad_inputs(pte_file):
    from mobilenet.export import pte_runner

    runner = pte_runner(pte_file[0])
    bad = {
        f"at most {PTE_BOUND}": torch.zeros(PTE_BOUND + 1, 3, 32, 32),
        "batch of 0": torch.zeros(0, 3, 32, 32),
        "shape (2, 3, 64, 64)": torch.zeros(2, 3, 64, 64),  # another size would run within the plan: refused
        "shape (3, 32, 32)": torch.zeros(3, 32, 32),
        "shape (2, 1, 32, 32)": torch.zeros(2, 1, 32, 32),
        "torch.float64": torch.zeros(2, 3, 32, 32, dtype=torch.float64),
        "torch.uint8": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        "ndarray": np.zeros((2, 3, 32, 32), dtype=np.float32),
        "list": [[0.0]],
    }
    for words, x in bad.items():
        with pytest.raises(MobileNetError, match=r"float32 batches of shape \(1\.\.40, 3, 32, 32\)") as caught:
            runner(x)
        assert words in str(caught.value)
    assert runner(torch.zeros(1, 3, 32, 32)).shape == (1, 10)  # still usable after the refusals


def test_pte_read_back_runs_batches_above_its_bound_in_pieces(model, pte_file):
    from mobilenet.export import load_export

    loaded = load_export(pte_file[0])
    x = torch.randn(2 * PTE_BOUND + 3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(loaded.run(x), expected, atol=1e-4, rtol=1e-5)


def test_pte_runner_refuses_files_that_are_not_programs(pte_file, tmp_path):
    from mobilenet.export import pte_runner

    cases = {
        "zeros.pte": b"\x00" * 64,
        "text.pte": b"not a program at all" * 10,
        "truncated.pte": pte_file[0].read_bytes()[:4096],
        "empty.pte": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MobileNetError, match=re.escape(name)):
            pte_runner(tmp_path / name)
    with pytest.raises(MobileNetError, match=r"does not exist|not a regular file"):
        pte_runner(tmp_path / "missing.pte")


@pytest.mark.slow
def test_pte_with_bound_1_is_a_static_program(model, tmp_path):
    pytest.importorskip("executorch", reason="ExecuTorch is an optional extra (pip install -e '.[mobile]')")
    from mobilenet.export import pte_runner

    result = export_model(model, tmp_path / "one.pte", format="pte", max_batch=1)
    runner = pte_runner(result.path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), atol=1e-4, rtol=1e-5)
    with pytest.raises(MobileNetError, match="at most 1"):
        runner(torch.zeros(2, 3, 32, 32))


@pytest.mark.parametrize("bad", [0, -1, 1025, 10**12, 2.5, True, "8", None, float("nan")])
def test_pte_max_batch_is_checked_before_any_work(model, tmp_path, bad):
    """Needs no executorch: a bad bound is refused before ExecuTorch is imported or anything exported."""
    from mobilenet.export import check_pte_max_batch, export_executorch

    with pytest.raises(MobileNetError, match="from 1 to 1024"):
        check_pte_max_batch(bad)
    with pytest.raises(MobileNetError, match="from 1 to 1024"):
        export_executorch(model, tmp_path / "m.pte", max_batch=bad)
    assert not list(tmp_path.iterdir())


# Any module lowered alone to an in-memory ExecuTorch program (benchmarks/fused_blocks.py times blocks this way).
NEEDS_EXECUTORCH = "ExecuTorch is an optional extra (pip install -e '.[mobile]')"


def test_module_pte_runner_runs_one_block_as_pytorch_does(model):
    pytest.importorskip("executorch", reason=NEEDS_EXECUTORCH)
    from mobilenet.export import module_pte_runner

    block = model.features[3]  # an inverted residual block (8 -> 48 -> 8 channels, stride 1, with its shortcut)
    example = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    runner = module_pte_runner(block, example, name="block 3")
    assert runner.max_batch == 1 and runner.input_shape == (1, 8, 32, 32)
    assert any(isinstance(m, nn.BatchNorm2d) for m in block.modules()), "the block must not be modified"
    x = torch.randn(1, 8, 32, 32, generator=torch.Generator().manual_seed(1))  # not the example it was traced on
    with torch.no_grad():
        expected = block(x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(runner(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(MobileNetError, match=r"block 3 takes .* at most 1"):
        runner(torch.zeros(2, 8, 32, 32))


def test_module_pte_runner_takes_batches_up_to_the_examples(model):
    pytest.importorskip("executorch", reason=NEEDS_EXECUTORCH)
    from mobilenet.export import module_pte_runner

    block = model.features[5]  # stride 2, no shortcut: 16x16x16 -> 8x8x24
    runner = module_pte_runner(block, torch.randn(3, 16, 16, 16))
    assert runner.max_batch == 3
    for batch in (1, 2, 3):
        x = torch.randn(batch, 16, 16, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = block(x)
        torch.testing.assert_close(runner(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(MobileNetError, match="at most 3"):
        runner(torch.zeros(4, 16, 16, 16))


class _TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2


def test_module_pte_runner_refuses_a_module_with_two_outputs():
    pytest.importorskip("executorch", reason=NEEDS_EXECUTORCH)
    from mobilenet.export import module_pte_runner

    with pytest.raises(MobileNetError, match=r"two outputs.*one NCHW image input and one output"):
        module_pte_runner(_TwoOutputs(), torch.zeros(1, 2, 4, 4), name="two outputs")


@pytest.mark.parametrize(
    ("module", "example", "words"),
    [
        (lambda x: x, torch.zeros(1, 3, 8, 8), "torch.nn.Module; got a function"),
        ("conv", torch.zeros(1, 3, 8, 8), "torch.nn.Module; got a str"),
        (nn.ReLU(), np.zeros((1, 3, 8, 8), dtype=np.float32), "got a ndarray"),
        (nn.ReLU(), [[0.0]], "got a list"),
        (nn.ReLU(), None, "got a NoneType"),
        (nn.ReLU(), torch.zeros(1, 3, 8, 8, dtype=torch.float64), "got torch.float64 of shape (1, 3, 8, 8)"),
        (nn.ReLU(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "got torch.uint8"),
        (nn.ReLU(), torch.zeros(3, 8, 8), "of shape (3, 8, 8)"),
        (nn.ReLU(), torch.zeros(1, 1, 3, 8, 8), "of shape (1, 1, 3, 8, 8)"),
        (nn.ReLU(), torch.zeros(1, 0, 8, 8), "of shape (1, 0, 8, 8)"),
        (nn.ReLU(), torch.zeros(0, 3, 8, 8), "got a batch of 0"),
        (nn.ReLU(), torch.zeros(1025, 1, 1, 1), "got a batch of 1025"),
    ],
)
def test_module_pte_runner_checks_its_arguments_before_any_work(module, example, words):
    """Needs no executorch: bad arguments are refused before ExecuTorch is imported."""
    from mobilenet.export import module_pte_runner

    with pytest.raises(MobileNetError, match=r"ExecuTorch|torch\.nn\.Module") as caught:
        module_pte_runner(module, example)
    assert words in str(caught.value)
    if "Module" not in words:
        assert "float32 NCHW example input with a batch from 1 to 1024" in str(caught.value)


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


@pytest.mark.parametrize("value", ["0", "-3", "1025", "99999999999"])
def test_cli_export_pte_max_batch_out_of_range(checkpoint, tmp_path, capsys, value):
    """Refused with the allowed range before executorch is needed (this runs where it is not installed)."""
    out = tmp_path / "m.pte"
    assert main(["export", str(checkpoint), "--format", "pte", "--out", str(out), "--max-batch", value]) == 2
    err = _one_line_error(capsys)
    assert "--max-batch" in err and "from 1 to 1024" in err and value in err
    assert not out.exists()


def test_cli_export_pte_max_batch_not_a_number(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["export", str(checkpoint), "--format", "pte", "--out", str(tmp_path / "m.pte"), "--max-batch", "lots"])
    assert caught.value.code == 2 and "--max-batch" in capsys.readouterr().err
