"""Runtime settings (allocator tuning, threads) and the Predictor's fast backends: what ``auto`` picks and that
every converted backend gives the eager PyTorch model's logits (max abs diff <= 1e-4)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from mobilenet.errors import MobileNetError
from mobilenet.models import create_model
from mobilenet.predict import Predictor
from mobilenet.runtime import NO_TUNING_ENV, AllocatorTuning, max_threads, set_threads, tune_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Repeated forwards of a small model at a batch whose activations are a few MB each: with glibc's defaults the
# freed top of the heap is trimmed (or the block was mmap'ed), so every forward touches fresh zero-filled pages.
FAULTS_SCRIPT = """
import torch
torch.set_num_threads(1)
from mobilenet.runtime import minor_faults, tune_allocator
state = tune_allocator()
from mobilenet.models import create_model
model = create_model("mobilenet_v2_0.35_96").eval()
x = torch.randn(8, 3, 96, 96)
with torch.inference_mode():
    for _ in range(2):
        model(x)
    before = minor_faults()
    for _ in range(3):
        model(x)
print(int(state.applied), (minor_faults() - before) // 3)
"""


def _faults(env_extra: dict[str, str]) -> tuple[bool, int]:
    env = {
        k: v for k, v in os.environ.items() if k not in (NO_TUNING_ENV, "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
    }
    # One thread: OpenMP workers allocate from their own glibc arenas, which the main arena's settings do not
    # fully govern; the test is about the main thread's activation buffers.
    env.update({"OMP_NUM_THREADS": "1", **env_extra})
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning exists only with glibc")
def test_tune_allocator_reports_what_it_did():
    state = tune_allocator()
    assert isinstance(state, AllocatorTuning) and state.applied and bool(state)
    assert "M_MMAP_MAX=0" in state.reason
    assert tune_allocator() is state  # idempotent: decided once per process
    assert state.to_dict() == {"applied": True, "reason": state.reason}


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning exists only with glibc")
def test_allocator_tuning_removes_page_faults_of_repeated_forwards():
    tuned_applied, tuned = _faults({})
    plain_applied, plain = _faults({NO_TUNING_ENV: "1"})
    assert tuned_applied and not plain_applied
    # Counts, not times. Measured per forward with glibc's defaults -> tuned: 1024 -> 0 on the development
    # machine, 2560 -> 288 on the CI machine (whose kernel counts some faults the tuning cannot remove, e.g.
    # stack and OpenMP scratch pages), so the bound is "most faults gone", not "all".
    assert plain >= 100, plain
    assert tuned * 4 <= plain, (tuned, plain)


def test_opt_out_variable_is_respected(monkeypatch):
    monkeypatch.setenv(NO_TUNING_ENV, "1")
    state = tune_allocator(force=True)
    assert not state.applied and NO_TUNING_ENV in state.reason
    monkeypatch.delenv(NO_TUNING_ENV)
    assert tune_allocator(force=True).applied == GLIBC


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == 1
    finally:
        torch.set_num_threads(before)
    for bad in (0, -2, 1.5, True, "2", max_threads() + 1, 10**5):  # 100,000 would exhaust memory starting a pool
        with pytest.raises(MobileNetError, match=f"threads must be an integer from 1 to {max_threads()}"):
            set_threads(bad)
    assert torch.get_num_threads() == before
    assert max_threads() >= max(64, 4 * (os.cpu_count() or 1))


@pytest.fixture(scope="module")
def trained_like_model() -> torch.nn.Module:
    """A small V2 with non-trivial BatchNorm statistics (so folding them changes the weights) and logits of a
    trained model's size (so a parity check at 1e-4 means something)."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2_0.35_96", resolution=64, num_classes=10)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    torch.nn.init.normal_(model.classifier.weight, 0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("backend", ["torch-jit", "onnxruntime", "auto"])
def test_fast_backends_match_pytorch(trained_like_model, backend):
    if backend != "torch-jit":
        pytest.importorskip("onnxruntime")
    predictor = Predictor(trained_like_model, backend=backend, num_threads=1)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = trained_like_model(x)
    assert expected.abs().max() > 1.0  # logits of a useful size: the check below can fail
    got = predictor.logits(x)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-4
    assert predictor.max_abs_diff is not None and predictor.max_abs_diff <= 1e-4
    # Any batch size works after conversion (the batch dimension stays dynamic).
    assert predictor.logits(x[:1]).shape == (1, 10)


def test_auto_picks_the_fastest_installed_backend(trained_like_model, monkeypatch, tmp_path):
    import mobilenet.backends as predict

    if predict.onnxruntime_available():
        assert Predictor(trained_like_model).backend_name == "onnxruntime"
        from mobilenet.export import export_onnx

        onnx_file = export_onnx(trained_like_model, tmp_path / "m.onnx").path
        assert Predictor(onnx_file).backend_name == "onnxruntime"
    from mobilenet import autotune

    installed = predict.backend_installed
    missing: set[str] = {"onnxruntime"}
    monkeypatch.setattr(predict, "onnxruntime_available", lambda: False)
    monkeypatch.setattr(autotune, "backend_installed", lambda name: name not in missing and installed(name))
    expected = "openvino" if predict.openvino_available() else "torch-jit"  # the next of the fixed order
    assert Predictor(trained_like_model).backend_name == expected
    missing.add("openvino")
    assert Predictor(trained_like_model).backend_name == "torch-jit"
    assert Predictor(trained_like_model, backend="torch").backend_name == "torch"


def test_auto_falls_back_when_a_conversion_fails(trained_like_model, monkeypatch):
    import mobilenet.backends as predict

    class Broken:
        def __init__(self, *args, **kwargs):
            raise MobileNetError("conversion failed")

    monkeypatch.setattr(predict, "onnxruntime_available", lambda: True)
    monkeypatch.setitem(predict.BACKENDS, "onnxruntime", Broken)
    monkeypatch.setitem(predict.BACKENDS, "openvino", Broken)
    choice = Predictor(trained_like_model)
    assert choice.backend_name == "torch-jit"
    assert "onnxruntime failed to build (conversion failed), next in order" in choice.backend_reason
    with pytest.raises(MobileNetError, match="conversion failed"):
        Predictor(trained_like_model, backend="onnxruntime")


def test_cli_tunes_the_allocator_only_for_commands_that_run_models(monkeypatch, capsys):
    import mobilenet.runtime as runtime
    from mobilenet.cli import MODEL_COMMANDS, main

    calls: list[int] = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append(1))
    assert main(["cost", "mobilenet_v2_1.0_224", "--format", "json"]) == 0
    assert calls == []
    assert main(["bench", "mobilenet_v2_0.35_96", "--rounds", "0"]) == 2  # stops at the argument check
    assert calls == [1]
    capsys.readouterr()
    assert set(MODEL_COMMANDS) == {"demo", "train", "eval", "predict", "compress", "bench", "reproduce", "select"}


def test_the_cache_directory_follows_an_absolute_xdg_cache_home_only(tmp_path, monkeypatch):
    """The XDG Base Directory specification: a relative $XDG_CACHE_HOME is invalid and ignored (it would scatter
    caches into whatever directory a command starts in); empty or unset means ~/.cache."""
    from mobilenet.runtime import user_cache_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = tmp_path / "home" / ".cache" / "mobilenet" / "c.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_path("c.json") == tmp_path / "xdg" / "mobilenet" / "c.json"
    for value in ("relative/dir", ".", ""):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert user_cache_path("c.json") == default
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_path("c.json") == default


def test_a_cache_write_keeps_what_another_process_wrote_meanwhile(tmp_path):
    """Two commands measuring at once: each read the cache before measuring, and the last to write replaced the
    other's entries with its own (the file stayed whole, the other's measurements were lost)."""
    from mobilenet.runtime import read_cache, write_cache

    path, notes = tmp_path / "c.json", []
    write_cache(path, {"shared": {"ms": 9.0}}, version=3, notes=notes)
    ours = read_cache(path, version=3, valid=lambda _entry: True, notes=notes, what="test")
    write_cache(path, {"shared": {"ms": 9.0}, "theirs": {"ms": 2.0}}, version=3, notes=notes)  # while we measured
    ours.update(mine={"ms": 1.0}, shared={"ms": 8.0})
    write_cache(path, ours, version=3, notes=notes)
    final = read_cache(path, version=3, valid=lambda _entry: True, notes=notes, what="test")
    assert final == {"shared": {"ms": 8.0}, "theirs": {"ms": 2.0}, "mine": {"ms": 1.0}}  # ours win a tie
    assert notes == []
