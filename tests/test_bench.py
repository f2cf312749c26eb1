"""``mobilenet bench`` and its timing tools: the JSON holds every figure and its figures agree with each
other (GFLOP/s = 2 * MACs * batch / latency, the FLOP limit from the GEMM peak); argument mistakes exit 2 with one
line. No timed assertions: the machine's speed is not the code's correctness. The scripts of benchmarks/ are
tested in test_benchmarks.py."""

from __future__ import annotations

import argparse
import inspect
import json
import math

import pytest

from mobilenet.backends import fused_available, openvino_available
from mobilenet.bench import (
    BENCH_BACKENDS,
    Candidate,
    parse_backends,
    parse_batch_sizes,
    summarize_timings,
    time_interleaved,
)
from mobilenet.cli import main
from mobilenet.cost import count_costs
from mobilenet.errors import MobileNetError

TINY = ["mobilenet_v2_0.35_96", "--resolution", "32", "--rounds", "2", "--warmup", "1", "--gemm-size", "64"]


def test_cli_bench_json_figures_are_consistent(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    plot = tmp_path / "bench.png"
    argv = ["bench", *TINY, "--backends", "eager,jit,onnxruntime,auto", "--batch-sizes", "1,2"]
    code = main([*argv, "--threads", "1", "--format", "json", "--quiet", "--plot", str(plot)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    machine = data["machine"]
    assert machine["threads"] == 1 and machine["logical_cpus"] >= 1 and isinstance(machine["simd"], list)
    assert {"cpu", "torch", "onnxruntime", "allocator", "load_average"} <= set(machine)
    assert data["settings"]["batch_sizes"] == [1, 2] and data["settings"]["rounds"] == 2
    peak = data["gemm_peak"]["gflops"]
    assert peak == max(m["gflops"] for m in data["gemm_peak"]["measurements"]) > 0
    macs = count_costs("mobilenet_v2_0.35_96", resolution=32).macs
    assert data["models"] == [
        {
            "model": "mobilenet_v2_0.35_96",
            "resolution": 32,
            "macs_per_image": macs,
            "config": data["models"][0]["config"],
        }
    ]
    results = data["results"]
    assert sorted((r["backend"], r["batch_size"]) for r in results) == sorted(
        (b, n) for b in ("eager", "jit", "onnxruntime", "auto") for n in (1, 2)
    )
    for row in results:
        latency = row["latency_ms"]
        seconds = latency["median"] / 1e3
        assert len(row["samples_ms"]) == 2
        assert latency["min"] == min(row["samples_ms"]) <= latency["median"] <= latency["p90"]
        assert row["macs_per_image"] == macs
        assert math.isclose(row["gflops"], 2 * macs * row["batch_size"] / seconds / 1e9, rel_tol=1e-9)
        assert math.isclose(row["throughput_ips"], row["batch_size"] / seconds, rel_tol=1e-9)
        assert math.isclose(row["flop_limit_ms"], 2 * macs * row["batch_size"] / peak / 1e6, rel_tol=1e-9)
        assert math.isclose(row["x_flop_limit"], latency["median"] / row["flop_limit_ms"], rel_tol=1e-9)
        assert math.isclose(row["fraction_of_peak"], row["gflops"] / peak, rel_tol=1e-9)
        assert row["max_abs_diff"] is not None and row["max_abs_diff"] <= 1e-4
    for batch in (1, 2):
        ratios = [r["x_fastest_fp32_runtime"] for r in results if r["batch_size"] == batch and r["backend"] != "auto"]
        assert min(ratios) == 1.0 and all(r >= 1.0 for r in ratios)
    assert any("auto picked onnxruntime" in note for note in data["notes"])


def test_cli_bench_table(capsys):
    argv = ["bench", *TINY, "--backends", "eager", "--batch-sizes", "1", "--threads", "1", "--pause-ms", "7"]
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "GEMM peak" in out and "FLOP limit" in out and "eager" in out and "MACs per image" in out
    assert "every timed call follows 7 ms of idle time" in out  # the pause the run used, said with its figures


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backends", "tensorrt"], "unknown backend 'tensorrt'"),
        (["--batch-sizes", "1,x"], "batch sizes must be integers"),
        (["--batch-sizes", "0"], "batch sizes must be integers >= 1"),
        (["--batch-sizes", "4,4"], "given twice"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--threads", "0"], "--threads must be an integer from 1 to"),
        (["--threads", "100000"], "--threads must be an integer from 1 to"),
    ],
)
def test_cli_bench_argument_errors(extra, message, capsys):
    assert main(["bench", "mobilenet_v2_0.35_96", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobilenet bench: error:") and message in err and "\n" not in err, err


def test_cli_bench_unknown_model(capsys):
    assert main(["bench", "mobilenet_v2_1.0_23", "--batch-sizes", "1", "--gemm-size", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobilenet bench: error:") and "mobilenet_v2_1.0_23" in err and "\n" not in err


def test_parsers():
    assert parse_batch_sizes("1, 32") == (1, 32)
    assert parse_batch_sizes([8]) == (8,)
    with pytest.raises(MobileNetError, match="no batch sizes"):
        parse_batch_sizes([])
    assert parse_backends(None) == (
        "eager",
        "channels_last",
        "jit",
        "onnxruntime",
        "openvino",
        "executorch",
        "fused",
        "openvino-bf16",
        "auto",
    )
    assert parse_backends("jit", int8=True, compile=True) == (
        "jit",
        "onnxruntime-int8",
        "openvino-int8",
        "fused-int8",
        "compile",
    )
    assert parse_backends("all") == tuple(BENCH_BACKENDS) and len(parse_backends("all")) == 14


def test_time_interleaved_rotates_and_counts():
    calls: list[str] = []
    candidates = [Candidate(name, name, lambda x, n=name: calls.append(n)) for name in "abc"]
    times = time_interleaved(candidates, None, rounds=3, warmup=1, pause=0)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    stats = summarize_timings([0.004, 0.001, 0.002, 0.003, 0.010])
    assert stats == {"median": 3.0, "p90": 10.0, "min": 1.0, "mean": 4.0}


def test_bench_int8_says_how_it_was_calibrated():
    pytest.importorskip("onnxruntime")
    from mobilenet.bench import bench

    report = bench(
        ["mobilenet_v2_0.35_96"],
        backends="onnxruntime",
        int8=True,
        batch_sizes="1",
        resolution=32,
        rounds=1,
        warmup=0,
        gemm_size=64,
        threads=1,
    )

    expected = [
        "onnxruntime",
        "onnxruntime-int8",
        *(["openvino-int8"] if openvino_available() else []),
        *(["fused-int8"] if fused_available() else []),
    ]
    assert [r["backend"] for r in report.results] == expected
    assert [r["precision"] for r in report.results] == ["fp32", *["int8"] * (len(expected) - 1)]
    assert report.results[0]["x_fastest_fp32_runtime"] == 1.0  # the only float32 row is its own yardstick
    assert report.to_dict()["settings"]["int8_calibration"] == "random noise"
    # The int8 model is the quantizer's default: its activation type is resolved and reported, never "auto".
    from mobilenet.quantize import default_activation_type

    assert report.to_dict()["settings"]["int8_activations"] == default_activation_type()
    assert any(f"activations {default_activation_type()}" in note for note in report.notes), report.notes
    assert any("random-noise images: a speed figure only" in note for note in report.notes)
    int8 = report.results[1]
    assert int8["x_fastest_fp32_runtime"] > 0 and int8["max_abs_diff"] is not None


def test_bench_leaves_out_a_backend_that_fails_to_build(monkeypatch):
    import torch

    from mobilenet.bench import bench

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    report = bench(
        ["mobilenet_v2_0.35_96"],
        backends="eager,compile",
        batch_sizes=[1],
        resolution=32,
        rounds=1,
        warmup=0,
        gemm_size=64,
        threads=1,
    )
    assert [r["backend"] for r in report.results] == ["eager"]
    assert any("compile left out: RuntimeError: no C++ compiler" in note for note in report.notes)
    with pytest.raises(MobileNetError, match="no model given"):
        bench([], batch_sizes=[1])


def test_bench_times_an_exported_file_as_it_is(tmp_path, capsys):
    """bench takes what export writes: an .onnx (or .ts, .pt2, .pte) runs in its own runtime, beside a checkpoint."""
    pytest.importorskip("onnxruntime")
    from mobilenet.bench import bench
    from mobilenet.checkpoint import save
    from mobilenet.export import export_model
    from mobilenet.models import create_model

    model = create_model("mobilenet_v2_0.35_96", resolution=32, num_classes=4)
    checkpoint = save(model, tmp_path / "m.safetensors")
    onnx_file = export_model(model, tmp_path / "m.onnx", format="onnx").path
    report = bench([str(onnx_file), str(checkpoint)], backends="eager", batch_sizes="1", rounds=1, warmup=0,
                   gemm_size=64, threads=1)  # fmt: skip
    assert [(r["model"], r["backend"]) for r in report.results] == [
        ("mobilenet_v2_0.35_96", "file"),
        ("mobilenet_v2_0.35_96", "eager"),
    ]
    assert any("runs in ONNX Runtime" in note for note in report.notes)
    assert main(["bench", str(onnx_file), "--resolution", "64", "--rounds", "1"]) == 2
    assert "runs at its own input size" in capsys.readouterr().err


def test_bench_times_a_tflite_as_it_is(tmp_path):
    """A LiteRT .tflite (batch 1) runs in LiteRT's interpreter; bench's batch 2 runs it image by image."""
    reason = "LiteRT is an optional extra (pip install -e '.[litert]')"
    pytest.importorskip("litert_torch", reason=reason)
    pytest.importorskip("ai_edge_litert.interpreter", reason=reason)
    from mobilenet.bench import bench
    from mobilenet.export import export_model
    from mobilenet.models import create_model

    model = create_model("mobilenet_v2_0.35_96", resolution=32, num_classes=4)
    tflite = export_model(model, tmp_path / "m.tflite", format="litert").path
    report = bench([str(tflite)], batch_sizes="1,2", rounds=1, warmup=0, gemm_size=64, threads=1)
    assert [(r["model"], r["backend"], r["batch_size"]) for r in report.results] == [
        ("mobilenet_v2_0.35_96", "file", 1),
        ("mobilenet_v2_0.35_96", "file", 2),
    ]
    assert any("LiteRT" in note for note in report.notes)


def test_bench_auto_chooses_for_each_batch_size():
    """auto measures for the batch size it is given, so bench's auto row asks it once per batch size."""
    from mobilenet.bench import bench

    report = bench(
        ["mobilenet_v1_0.25_128"],
        backends="jit,auto",
        batch_sizes="1,2",
        resolution=32,
        rounds=1,
        warmup=1,
        gemm_size=64,
        threads=1,
    )
    said = [note for note in report.notes if ": auto: batch " in note]
    assert [note.split(": auto: ")[1].split(":")[0] for note in said] == ["batch 1", "batch 2"]
    assert {r["batch_size"] for r in report.results if r["backend"] == "auto"} == {1, 2}


def test_the_default_pause_outlasts_every_backends_idle_spin():
    # A row timed while its predecessor's workers still spin measures the neighbour: the pause must be longer.
    from mobilenet import timing
    from mobilenet.bench import DEFAULT_PAUSE_S
    from mobilenet.cli.bench_cmd import register

    assert DEFAULT_PAUSE_S is timing.DEFAULT_PAUSE_S  # one default for bench, auto's choice and select
    assert inspect.signature(timing.time_interleaved).parameters["pause"].default == DEFAULT_PAUSE_S
    if fused_available():
        from mobilenet.fused import worker_spin_seconds

        assert DEFAULT_PAUSE_S > worker_spin_seconds() > 0
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["bench"]).pause_ms == DEFAULT_PAUSE_S * 1e3


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"gemm_size": 1_000_000}, "gemm size must be at most 8192"),  # was the allocator's RuntimeError (4 TB)
        ({"pause": 1e9}, "at most 60 s"),  # slept 1e9 s before the first timed call: a hang
        ({"batch_sizes": None}, "batch sizes must be text"),  # TypeError: not iterable
        ({"batch_sizes": 5}, "batch sizes must be text"),
        ({"int8": True, "calibration": 5}, "calibration must be a directory path"),  # TypeError in os.fspath
    ],
    ids=["gemm-huge", "pause-huge", "batch-none", "batch-int", "calibration-int"],
)
def test_bench_refuses_settings_it_cannot_run_before_measuring(settings, words):
    from mobilenet.bench import bench

    arguments = {"backends": "eager", "batch_sizes": [1], "rounds": 1, "warmup": 0, "gemm_size": 32, "pause": 0.0}
    with pytest.raises(MobileNetError, match=words):
        bench(["mobilenet_v1_0.25_128"], **{**arguments, **settings})


@pytest.mark.parametrize(("option", "value"), [("--pause-ms", "1e12"), ("--gemm-size", "1000000")])
def test_cli_bench_refuses_a_pause_or_gemm_it_could_not_run(option, value, capsys):
    assert main(["bench", "mobilenet_v1_0.25_128", "--backends", "eager", option, value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("at most 8192" in err or "from 0 to 60000" in err), err
