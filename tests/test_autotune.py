"""mobilenet.autotune: ``backend="auto"`` on the CPU measures the installed candidates (with a fake timer here),
keeps the fastest, caches the choice and says why; measuring off is the fixed order."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from PIL import Image

from mobilenet import autotune, runtime
from mobilenet.backends import BACKENDS, backend_installed, load_source, onnxruntime_available
from mobilenet.checkpoint import save
from mobilenet.cli import main
from mobilenet.errors import MobileNetError
from mobilenet.models import create_model
from mobilenet.predict import Predictor
from mobilenet.runtime import describe_machine


def backends_installed(*names: str) -> bool:
    return all(backend_installed(name) for name in names)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("mobilenet_v1_0.25_128", resolution=32, small_input=True, num_classes=10).eval()


class FakeTimer:
    """Stands in for :func:`mobilenet.timing.time_interleaved`: each candidate takes ``ms[name]`` milliseconds."""

    def __init__(self, ms: dict[str, float]) -> None:
        self.ms = ms
        self.calls: list[tuple[list[str], tuple[int, ...], int]] = []

    def __call__(self, candidates, x, *, rounds, warmup, pause=0.02):
        self.calls.append(([c.name for c in candidates], tuple(x.shape), rounds))
        for candidate in candidates:
            candidate.run(x)  # the built runner really runs the batch
        return {c.name: [self.ms[c.name] / 1e3] * rounds for c in candidates}


class Builds:
    """Wraps the backends of BACKENDS to count what gets built (``fail``: those that raise instead)."""

    def __init__(self, monkeypatch, fail: tuple[str, ...] = ()) -> None:
        self.built: list[str] = []
        for name in autotune.CPU_CANDIDATES:
            monkeypatch.setitem(BACKENDS, name, self._wrap(name, BACKENDS[name], name in fail))

    def _wrap(self, name, cls, fail):
        def build(source, **options):
            if fail:
                raise MobileNetError(f"{name} cannot run this model")
            self.built.append(name)
            return cls(source, **options)

        return build


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    """Measuring on, the cache under tmp_path, onnxruntime installed (as in the test extra); the float32 candidates
    narrowed to two, so the fake timings below say exactly who wins (OpenVINO and ExecuTorch have their own tests)."""
    monkeypatch.setenv("MOBILENET_AUTO_MEASURE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(autotune.PRECISION_CANDIDATES, "fp32", ("onnxruntime", "torch-jit"))
    if not onnxruntime_available():
        pytest.skip("needs the onnx extra (onnxruntime)")
    return tmp_path / "cache" / "mobilenet" / "auto-backend.json"


def _timer(monkeypatch, **ms: float) -> FakeTimer:
    fake = FakeTimer({name.replace("_", "-"): value for name, value in ms.items()})
    monkeypatch.setattr(autotune, "time_interleaved", fake)
    return fake


@pytest.mark.parametrize(
    ("ms", "winner"),
    [({"onnxruntime": 3.1, "torch_jit": 4.0}, "onnxruntime"), ({"onnxruntime": 5.0, "torch_jit": 2.0}, "torch-jit")],
)
def test_the_fastest_candidate_wins_and_says_why(measuring, monkeypatch, model, ms, winner):
    timer = _timer(monkeypatch, **ms)
    predictor = Predictor(model, num_threads=1, batch_size=4)
    assert predictor.backend_name == winner
    assert timer.calls and all(sorted(names) == ["onnxruntime", "torch-jit"] for names, _, _ in timer.calls)
    assert all(shape == (4, 3, 32, 32) for _, shape, _ in timer.calls)  # the Predictor's batch size
    assert sum(rounds for _, _, rounds in timer.calls) >= autotune.MIN_ROUNDS
    loser = "torch-jit" if winner == "onnxruntime" else "onnxruntime"
    fast, slow = sorted(ms.values())
    assert predictor.backend_reason == f"measured: {winner} {fast:.3g} ms vs {loser} {slow:.3g} ms at batch 4, 1 thread"
    assert predictor.predict(torch.zeros(3, 32, 32, dtype=torch.uint8))[0].ok
    assert json.loads(measuring.read_text())["entries"]  # the choice was written


def test_the_choice_is_cached_and_the_next_predictor_measures_nothing(measuring, monkeypatch, model):
    timer = _timer(monkeypatch, onnxruntime=5.0, torch_jit=2.0)
    Predictor(model, num_threads=1, batch_size=4)
    calls = len(timer.calls)
    builds = Builds(monkeypatch)
    second = Predictor(model, num_threads=1, batch_size=4)
    assert len(timer.calls) == calls and builds.built == ["torch-jit"]  # only the chosen backend is built
    assert second.backend_name == "torch-jit"
    assert (
        second.backend_reason.startswith("cached from 20")
        and "torch-jit 2 ms vs onnxruntime 5 ms" in second.backend_reason
    )
    Predictor(model, num_threads=1, batch_size=8)  # another batch size is another key: measured
    assert len(timer.calls) > calls


def test_the_key_changes_with_threads_batch_cpu_and_versions_not_with_load_or_weights(model):
    source = load_source(model)
    machine = describe_machine(2)
    key = autotune.auto_cache_key(source, batch=32, threads=2, machine=machine)
    assert key == autotune.auto_cache_key(source, batch=32, threads=2, machine=dict(machine, load_average=[9.0]))
    retrained = create_model("mobilenet_v1_0.25_128", resolution=32, small_input=True, num_classes=10)
    assert key == autotune.auto_cache_key(load_source(retrained), batch=32, threads=2, machine=machine)
    other_arch = create_model("mobilenet_v1_0.5_128", resolution=32, small_input=True, num_classes=10)
    others = [
        autotune.auto_cache_key(source, batch=32, threads=1, machine=machine),
        autotune.auto_cache_key(source, batch=1, threads=2, machine=machine),
        autotune.auto_cache_key(source, batch=32, threads=2, machine=dict(machine, cpu="Intel Xeon")),
        autotune.auto_cache_key(source, batch=32, threads=2, machine=dict(machine, simd=["avx2"])),
        autotune.auto_cache_key(source, batch=32, threads=2, machine=dict(machine, torch="2.0")),
        autotune.auto_cache_key(source, batch=32, threads=2, machine=dict(machine, onnxruntime="1.0")),
        autotune.auto_cache_key(load_source(other_arch), batch=32, threads=2, machine=machine),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_the_key_names_an_instruction_set_forced_on_the_fused_kernel(model, monkeypatch):
    """A choice measured with MOBILENET_FUSED_ISA=avx2 (the fused kernel slower than it can be) is not the choice
    for the best instruction set, nor the other way round; unset, the key is what it always was."""
    source = load_source(model)
    machine = describe_machine(2)
    monkeypatch.delenv("MOBILENET_FUSED_ISA", raising=False)
    plain = autotune.auto_cache_key(source, batch=1, threads=2, machine=machine)
    assert "fused_isa" not in json.loads(plain)  # caches written before keep their entries
    keys = {plain}
    for isa in ("avx2", "portable"):
        monkeypatch.setenv("MOBILENET_FUSED_ISA", isa)
        keys.add(autotune.auto_cache_key(source, batch=1, threads=2, machine=machine))
    assert len(keys) == 3


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        json.dumps({"version": 1, "entries": []}).encode(),
        json.dumps({"version": 1, "entries": {"k": {"backend": "x"}}}).encode(),
    ],
)
def test_a_corrupt_cache_is_ignored(measuring, monkeypatch, model, content):
    timer = _timer(monkeypatch, onnxruntime=3.0, torch_jit=4.0)
    measuring.parent.mkdir(parents=True)
    measuring.write_bytes(content)
    predictor = Predictor(model, num_threads=1, batch_size=4)
    assert timer.calls and predictor.backend_name == "onnxruntime"
    assert json.loads(measuring.read_text())["version"] == autotune.CACHE_VERSION  # rewritten, readable again


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "deep-json", "huge"])
def test_a_cache_path_holding_a_special_or_hostile_file_is_ignored(measuring, monkeypatch, model, kind):
    """A FIFO would block the reader forever, /dev/zero never ends, a deeply nested document would escape the JSON
    parser as a RecursionError: each is passed over with a note, and measuring goes on."""
    timer = _timer(monkeypatch, onnxruntime=3.0, torch_jit=4.0)
    measuring.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(measuring)
    elif kind == "dev-zero":
        measuring.symlink_to("/dev/zero")
    elif kind == "directory":
        measuring.mkdir()
    elif kind == "deep-json":
        measuring.write_text("[" * 100_000 + "]" * 100_000)
    else:
        with open(measuring, "wb") as handle:  # sparse: over the limit without writing it
            handle.truncate(runtime.MAX_CACHE_BYTES + 1)
    predictor = Predictor(model, num_threads=1, batch_size=4)
    assert timer.calls and predictor.backend_name == "onnxruntime"
    words = {
        "fifo": "not a regular file",
        "dev-zero": "not a regular file",
        "directory": "is a directory",
        "deep-json": "could not be read (JSONDecodeError)",
        "huge": "over its 16,777,216-byte limit",
    }[kind]
    assert words in predictor.backend_reason and "ignored, measuring again" in predictor.backend_reason
    if kind == "fifo":  # a special file is not ours to replace: left as it is
        assert stat.S_ISFIFO(os.lstat(measuring).st_mode)
    elif kind != "directory":  # the measurement replaced what was there (the link, not /dev/zero) with a cache
        assert json.loads(measuring.read_text())["version"] == autotune.CACHE_VERSION


def test_an_unwritable_cache_is_ignored(measuring, monkeypatch, model, tmp_path):
    _timer(monkeypatch, onnxruntime=3.0, torch_jit=4.0)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache directory cannot be created
    predictor = Predictor(model, num_threads=1, batch_size=4)
    assert predictor.backend_name == "onnxruntime" and "could not be written" in predictor.backend_reason


def test_a_candidate_that_fails_to_build_is_skipped(measuring, monkeypatch, model):
    timer = _timer(monkeypatch, onnxruntime=1.0, torch_jit=4.0)
    Builds(monkeypatch, fail=("onnxruntime",))
    predictor = Predictor(model, num_threads=1, batch_size=4)
    assert predictor.backend_name == "torch-jit" and timer.calls == []
    assert "onnxruntime skipped: failed to build (onnxruntime cannot run this model)" in predictor.backend_reason
    assert not measuring.exists()  # nothing measured, nothing cached


def test_a_cached_choice_that_no_longer_builds_is_measured_again(measuring, monkeypatch, model):
    timer = _timer(monkeypatch, onnxruntime=1.0, torch_jit=4.0)
    Predictor(model, num_threads=1, batch_size=4)
    Builds(monkeypatch, fail=("onnxruntime",))
    predictor = Predictor(model, num_threads=1, batch_size=4)
    assert predictor.backend_name == "torch-jit" and len(timer.calls) == 2  # the first run's two timing calls
    assert "the cached choice onnxruntime failed to build" in predictor.backend_reason


def test_measuring_off_is_the_fixed_order(monkeypatch, model):
    timer = _timer(monkeypatch, onnxruntime=9.0, torch_jit=1.0)
    monkeypatch.setenv("MOBILENET_AUTO_MEASURE", "0")
    predictor = Predictor(model, num_threads=1)
    fixed = "onnxruntime" if onnxruntime_available() else "torch-jit"
    assert predictor.backend_name == fixed and timer.calls == []
    assert predictor.backend_reason == "fixed order: measuring is off (MOBILENET_AUTO_MEASURE=0)"
    assert Predictor(model, backend="torch").backend_reason == "asked for torch"


def test_cli_predict_verbose_says_why(measuring, monkeypatch, model, tmp_path, capsys):
    _timer(monkeypatch, onnxruntime=5.0, torch_jit=2.0)
    checkpoint = save(model, tmp_path / "m.safetensors")
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    measuring.parent.mkdir(parents=True)
    measuring.write_text("{corrupt")
    code = main(["predict", str(checkpoint), str(tmp_path / "a.png"), "--threads", "1", "--verbose"])
    _out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert "backend torch-jit, fp32 (measured: torch-jit 2 ms vs onnxruntime 5 ms at batch 32, 1 thread" in err
    assert "could not be read" in err


def test_the_key_changes_with_the_precision_tier_and_with_a_file(model, tmp_path):
    source = load_source(model)
    machine = describe_machine(2)
    fp32 = autotune.auto_cache_key(source, batch=1, threads=2, machine=machine)
    keys = {
        fp32,
        autotune.auto_cache_key(source, batch=1, threads=2, machine=machine, precision="auto-fast"),
        autotune.auto_cache_key(source, batch=1, threads=2, machine=dict(machine, openvino="0.1")),
        autotune.auto_cache_key(source, batch=1, threads=2, machine=dict(machine, executorch="0.1")),
    }
    if onnxruntime_available():
        from mobilenet.export import export_onnx

        file = load_source(export_onnx(model, tmp_path / "m.onnx").path)
        keys.add(autotune.auto_cache_key(file, batch=1, threads=2, machine=machine))
    assert len(keys) == (5 if onnxruntime_available() else 4)


@pytest.mark.skipif(not backends_installed("onnxruntime", "openvino"), reason="needs the onnx and openvino extras")
def test_openvino_is_measured_with_the_others_and_can_win(measuring, monkeypatch, model):
    monkeypatch.setitem(autotune.PRECISION_CANDIDATES, "fp32", ("onnxruntime", "openvino", "torch-jit"))
    timer = _timer(monkeypatch, onnxruntime=3.0, openvino=2.0, torch_jit=4.0)
    predictor = Predictor(model, num_threads=1, batch_size=2)
    assert predictor.backend_name == "openvino" and predictor.precision == "fp32"
    assert all(sorted(names) == ["onnxruntime", "openvino", "torch-jit"] for names, _, _ in timer.calls)
    assert predictor.backend_reason.startswith("measured: openvino 2 ms vs onnxruntime 3 ms vs torch-jit 4 ms")


@pytest.mark.skipif(not backends_installed("onnxruntime", "openvino"), reason="needs the onnx and openvino extras")
def test_an_onnx_file_is_measured_among_the_runtimes_that_read_it(measuring, monkeypatch, model, tmp_path):
    from mobilenet.export import export_onnx

    monkeypatch.setitem(autotune.PRECISION_CANDIDATES, "fp32", ("onnxruntime", "openvino", "torch-jit"))
    path = export_onnx(model, tmp_path / "m.onnx").path
    timer = _timer(monkeypatch, onnxruntime=3.0, openvino=2.0)
    predictor = Predictor(path, num_threads=1, batch_size=2)
    assert predictor.backend_name == "openvino"
    assert all(sorted(names) == ["onnxruntime", "openvino"] for names, _, _ in timer.calls)


# ----------------------------------------------------------------------------------------------------------------
# ExecuTorch as a candidate
# ----------------------------------------------------------------------------------------------------------------


def test_executorch_is_a_candidate_and_skipped_silently_when_not_installed(monkeypatch, tmp_path, model):
    from mobilenet.backends import backend_installed

    assert "executorch" in autotune.CPU_CANDIDATES and "executorch" in BACKENDS
    monkeypatch.setitem(__import__("sys").modules, "executorch", None)  # as if the mobile extra were not installed
    assert not backend_installed("executorch")
    monkeypatch.setenv("MOBILENET_AUTO_MEASURE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(autotune.PRECISION_CANDIDATES, "fp32", ("onnxruntime", "torch-jit", "executorch"))
    if not onnxruntime_available():
        pytest.skip("needs the onnx extra (onnxruntime)")
    timer = _timer(monkeypatch, onnxruntime=3.0, torch_jit=2.0)
    predictor = Predictor(model, num_threads=1, batch_size=4)
    assert predictor.backend_name == "torch-jit" and timer.calls[0][0] == ["onnxruntime", "torch-jit"]
    assert "executorch" not in predictor.backend_reason  # skipped without a note, as an absent onnxruntime is
    with pytest.raises(MobileNetError, match=r"pip install executorch"):
        BACKENDS["executorch"](load_source(model))


def test_executorch_backend_refuses_what_it_cannot_run(model, tmp_path):
    with pytest.raises(MobileNetError, match="CPU"):
        BACKENDS["executorch"](load_source(model), device="cuda")
    onnx_file = tmp_path / "m.onnx"
    pytest.importorskip("onnxruntime")
    from mobilenet.export import export_onnx

    export_onnx(model, onnx_file)
    with pytest.raises(MobileNetError, match="PyTorch model"):
        BACKENDS["executorch"](load_source(onnx_file))


def test_executorch_backend_equals_pytorch_and_is_measured(monkeypatch, tmp_path, model):
    pytest.importorskip("executorch", reason="ExecuTorch is an optional extra (pip install -e '.[mobile]')")
    backend = BACKENDS["executorch"](load_source(model), num_threads=1)
    assert backend.max_abs_diff is not None and backend.max_abs_diff <= 1e-4
    x = torch.randn(37, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # above the .pte's default bound
    with torch.no_grad():
        torch.testing.assert_close(backend(x), model(x), atol=1e-4, rtol=1e-5)

    # auto measures it beside the others and can pick it.
    monkeypatch.setenv("MOBILENET_AUTO_MEASURE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(autotune.PRECISION_CANDIDATES, "fp32", ("onnxruntime", "torch-jit", "executorch"))
    if not onnxruntime_available():
        pytest.skip("needs the onnx extra (onnxruntime)")
    timer = _timer(monkeypatch, onnxruntime=3.0, torch_jit=2.0, executorch=1.0)
    predictor = Predictor(model, num_threads=1, batch_size=4)
    assert predictor.backend_name == "executorch"
    assert set(timer.calls[0][0]) == {"onnxruntime", "torch-jit", "executorch"}
    assert predictor.backend_reason.startswith("measured: executorch 1 ms")


def test_an_int8_exported_program_runs_as_it_is(model):
    """An int8 .pte (its metadata says how it was quantized) is an exported program: auto runs it in int8."""
    from dataclasses import replace

    program = replace(load_source(model), model=None, program=model, metadata={"quantization": {"weights": "int8"}})
    for precision in (None, "int8"):
        choice = autotune.choose_backend("auto", program, precision=precision)
        assert choice.name == "exported" and choice.reason.startswith("fixed: an exported")
    with pytest.raises(MobileNetError, match="already int8"):
        autotune.choose_backend("auto", program, precision="fp32")


def test_a_close_call_is_timed_again_between_the_close_ones_only(measuring, monkeypatch, model):
    """Medians within CLOSE_CALL of the fastest are measured again (as many rounds, the close ones only)."""
    monkeypatch.setitem(autotune.PRECISION_CANDIDATES, "fp32", ("onnxruntime", "torch-jit"))
    timer = _timer(monkeypatch, onnxruntime=2.0, torch_jit=2.1)
    predictor = Predictor(model, num_threads=1, batch_size=2)
    assert predictor.backend_name == "onnxruntime"
    assert len(timer.calls) == 3 and sorted(timer.calls[2][0]) == ["onnxruntime", "torch-jit"]
    assert timer.calls[2][2] == timer.calls[1][2] + 1  # as many rounds again as the first pass took
    far = _timer(monkeypatch, onnxruntime=2.0, torch_jit=2.5)  # 1.25x apart: decided in the first pass
    Predictor(model, num_threads=1, batch_size=3)
    assert len(far.calls) == 2


@pytest.mark.parametrize(
    "edit",
    [
        lambda entry: entry.__setitem__("backend", ["torch-jit"]),  # unhashable: was TypeError in the lookup
        lambda entry: entry["latency_ms"].__setitem__("torch-jit", 10**400),  # no float: was OverflowError
        lambda entry: entry["latency_ms"].__setitem__("torch-jit", 1e300),  # no measurement takes that long
        # Trusted whatever their own figures said: a backend slower than another by its own medians was used, a
        # batch of 999 or threads `true` were printed as the measurement's settings, and a measured_at holding a
        # newline and terminal escapes went into predict's one status line.
        lambda entry: entry.__setitem__("backend", "onnxruntime"),  # the slower of its own medians
        lambda entry: entry["latency_ms"].pop("torch-jit"),  # a choice without its own median
        lambda entry: entry.__setitem__("batch", 999),  # another key's settings
        lambda entry: entry.__setitem__("threads", True),
        lambda entry: entry.__setitem__("measured_at", "2026-01-01\n\x1b[2Jmobilenet: all good"),
    ],
    ids=[
        "backend-list",
        "latency-400-digits",
        "latency-1e300",
        "not-the-fastest",
        "no-median-of-its-choice",
        "other-batch",
        "threads-bool",
        "measured-at-escapes",
    ],
)
def test_an_edited_cache_entry_is_measured_again_not_trusted(measuring, monkeypatch, model, edit):
    timer = _timer(monkeypatch, onnxruntime=5.0, torch_jit=2.0)
    first = Predictor(model, num_threads=1, batch_size=4)
    assert first.backend_name == "torch-jit"
    calls = len(timer.calls)
    data = json.loads(measuring.read_text())
    for entry in data["entries"].values():
        edit(entry)
    measuring.write_text(json.dumps(data))
    again = Predictor(model, num_threads=1, batch_size=4)
    assert len(timer.calls) > calls and again.backend_reason.startswith("measured")
    assert again.backend_name == "torch-jit" and again.backend_reason.isprintable()


def test_an_unedited_cache_entry_is_used_without_measuring(measuring, monkeypatch, model):
    """The control for the edited entries above."""
    timer = _timer(monkeypatch, onnxruntime=5.0, torch_jit=2.0)
    Predictor(model, num_threads=1, batch_size=4)
    calls = len(timer.calls)
    again = Predictor(model, num_threads=1, batch_size=4)
    assert len(timer.calls) == calls and again.backend_reason.startswith("cached from")
