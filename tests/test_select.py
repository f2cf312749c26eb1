"""mobilenet.select and `mobilenet select`: the pick, the Pareto front and the cache, with a fake timer (no model
is timed here); hostile inputs get one line and exit 2."""

from __future__ import annotations

import json
import math
import os
import stat

import pytest

from mobilenet import autotune, backends, select
from mobilenet.backends import backend_installed
from mobilenet.cli import main
from mobilenet.errors import MobileNetError

#: Fake median latencies (ms): deliberately not monotonic in MACs, so the front is not every point.
FAKE_MS = {
    "mobilenet_v1_1.0_224": 20.0,
    "mobilenet_v1_1.0_192": 15.0,
    "mobilenet_v1_1.0_160": 11.0,
    "mobilenet_v1_1.0_128": 8.0,
    "mobilenet_v1_0.75_224": 12.0,  # 68.4: beats 1.0_160 (67.2) although slower -> both on the front
    "mobilenet_v1_0.5_224": 9.0,  # 63.7 at 9 ms: beaten by 1.0_128 (64.4 at 8 ms)
    "mobilenet_v1_0.5_160": 4.0,
    "mobilenet_v1_0.25_224": 3.0,
    "mobilenet_v2_1.4_224": 30.0,
    "mobilenet_v2_1.0_224": 14.0,  # 72.0 at 14 ms: beats every V1 slower than it
}


class FakeTimer:
    def __init__(self, scale: float = 1.0) -> None:
        self.calls: list[list[str]] = []
        self.scale = scale

    def __call__(self, models, **_settings):
        self.calls.append(list(models))
        return {m: [self.scale * FAKE_MS[m] / 1e3] * 3 for m in models}


@pytest.fixture
def timer(monkeypatch):
    fake = FakeTimer()
    monkeypatch.setattr(select, "measure_latencies", fake)
    monkeypatch.setattr(
        select, "_resolve_backend", lambda backend, *_args: "torch-jit" if backend == "auto" else backend
    )
    return fake


def test_the_grid_is_the_published_points():
    points = {p.model: p for p in select.published_points()}
    assert set(points) == set(FAKE_MS)
    assert points["mobilenet_v1_0.5_160"].top1 == 60.2 and points["mobilenet_v1_0.5_160"].source == "V1 Table 9"
    assert points["mobilenet_v2_1.4_224"].top1 == 74.7
    assert {p.family for p in select.published_points(["v2"])} == {"v2"}


def test_the_pick_is_the_most_accurate_within_the_budget(timer, tmp_path):
    result = select.select_model(12.5, cache_path=tmp_path / "c.json", threads=1)
    assert result.pick["model"] == "mobilenet_v1_0.75_224"  # 68.4 at 12 ms; 1.0_192 (69.1) takes 15 ms
    result = select.select_model(14.0, cache_path=tmp_path / "c.json", threads=1)
    assert result.pick["model"] == "mobilenet_v2_1.0_224"  # exactly at the budget counts
    result = select.select_model(3.5, families="v1", cache_path=tmp_path / "c.json", threads=1)
    assert result.pick["model"] == "mobilenet_v1_0.25_224"


def test_the_pareto_front(timer, tmp_path):
    result = select.select_model(100, cache_path=tmp_path / "c.json", threads=1)
    assert [p["model"] for p in result.pareto] == [
        "mobilenet_v1_0.25_224",
        "mobilenet_v1_0.5_160",
        "mobilenet_v1_1.0_128",
        "mobilenet_v1_1.0_160",
        "mobilenet_v1_0.75_224",
        "mobilenet_v2_1.0_224",
        "mobilenet_v2_1.4_224",
    ]
    assert result.pick["model"] == "mobilenet_v2_1.4_224"


def test_pareto_front_keeps_only_undominated_points():
    points = [
        {"model": "a", "latency_ms": 1.0, "top1": 50.0},
        {"model": "b", "latency_ms": 1.0, "top1": 55.0},  # same speed, more accurate: a is dominated
        {"model": "c", "latency_ms": 2.0, "top1": 55.0},  # slower, no more accurate: dominated by b
        {"model": "d", "latency_ms": 3.0, "top1": 60.0},
    ]
    assert [p["model"] for p in select.pareto_front(points)] == ["b", "d"]


def test_a_second_call_measures_nothing(timer, tmp_path):
    cache = tmp_path / "c.json"
    first = select.select_model(10, cache_path=cache, threads=1)
    assert len(first.measured) == 10 and first.cached == []
    second = select.select_model(5, cache_path=cache, threads=1)
    assert len(timer.calls) == 1 and second.measured == [] and len(second.cached) == 10
    assert second.points == [dict(p, cached=True) for p in first.points]
    select.select_model(5, cache_path=cache, threads=1, use_cache=False)
    assert len(timer.calls) == 2 and len(timer.calls[1]) == 10


def test_the_cache_key_changes_with_the_machine_threads_and_settings(monkeypatch):
    monkeypatch.delenv("MOBILENET_FUSED_ISA", raising=False)
    machine = {"cpu": "AMD EPYC", "simd": ["avx2", "avx512f"], "torch": "2.5", "onnxruntime": "1.20"}
    base = {"resolution": 224, "batch": 1, "threads": 2, "backend": "onnxruntime", "precision": "fp32"}
    key = select.cache_key("m", **base, machine=machine)
    assert key == select.cache_key("m", **base, machine=dict(machine, load_average=[9.0]))
    others = [
        select.cache_key("m", **dict(base, threads=1), machine=machine),
        select.cache_key("m", **dict(base, batch=8), machine=machine),
        select.cache_key("m", **dict(base, backend="torch-jit"), machine=machine),
        select.cache_key("m", **base, machine=dict(machine, cpu="Intel Xeon")),
        select.cache_key("m", **base, machine=dict(machine, simd=["avx2"])),
        select.cache_key("m", **base, machine=dict(machine, torch="2.6")),
        select.cache_key("m", **base, machine=dict(machine, onnxruntime=None)),
    ]
    monkeypatch.setenv("MOBILENET_FUSED_ISA", "avx2")  # the fused kernel held below its best instruction set
    others.append(select.cache_key("m", **base, machine=machine))
    assert key not in others and len(set(others)) == len(others)


def test_other_threads_or_cpu_measure_again(timer, tmp_path, monkeypatch):
    cache = tmp_path / "c.json"
    select.select_model(10, cache_path=cache, threads=1, families="v2")
    select.select_model(10, cache_path=cache, threads=2, families="v2")
    assert len(timer.calls) == 2
    real = select.describe_machine
    monkeypatch.setattr(select, "describe_machine", lambda threads: dict(real(threads), cpu="Another CPU"))
    select.select_model(10, cache_path=cache, threads=1, families="v2")
    assert len(timer.calls) == 3


def test_nothing_within_the_budget_names_the_fastest(timer, tmp_path):
    result = select.select_model(1.0, cache_path=tmp_path / "c.json", threads=1)
    assert result.pick is None and result.fastest["model"] == "mobilenet_v1_0.25_224"


@pytest.mark.parametrize("budget", [0, -1.0, math.nan, math.inf, "5", True])
def test_bad_budgets_are_refused(budget, timer, tmp_path):
    with pytest.raises(MobileNetError, match="budget"):
        select.select_model(budget, cache_path=tmp_path / "c.json")
    assert timer.calls == []


def test_a_corrupt_cache_is_ignored_with_a_note(timer, tmp_path):
    cache = tmp_path / "c.json"
    for data in (b"{not json", json.dumps({"version": 1, "entries": []}).encode(), b"\xff\xfe"):
        cache.write_bytes(data)
        result = select.select_model(10, cache_path=cache, threads=1)
        assert len(result.measured) == 10 and any("ignored" in note for note in result.notes)
    assert len(select.select_model(10, cache_path=cache, threads=1).cached) == 10  # rewritten, readable again


def test_a_file_at_the_cache_path_that_is_no_cache_is_kept_aside_not_overwritten(timer, tmp_path):
    """A --cache naming someone's file by mistake must not cost them the file: it is renamed NAME.unusable, and the
    new cache is written in its place."""
    cache = tmp_path / "weights.safetensors"
    cache.write_bytes(b"precious bytes, not a cache")
    result = select.select_model(10, cache_path=cache, threads=1)
    assert len(result.measured) == 10 and any("kept as" in note for note in result.notes)
    assert (tmp_path / "weights.safetensors.unusable").read_bytes() == b"precious bytes, not a cache"
    assert len(select.select_model(10, cache_path=cache, threads=1).cached) == 10  # the new cache is readable


def test_a_special_file_at_the_cache_path_is_left_as_it_is(timer, tmp_path):
    """A FIFO (or, for root, a device such as /dev/null) at the cache path is neither read nor replaced by a file."""
    fifo = tmp_path / "c.json"
    os.mkfifo(fifo)
    for _ in range(2):
        result = select.select_model(10, cache_path=fifo, threads=1)
        assert len(result.measured) == 10 and any("left as it is" in note for note in result.notes)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    device = tmp_path / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        return  # not root: a device node cannot be made here (nor could an unprivileged run replace /dev/null)
    select.select_model(10, cache_path=device, threads=1)
    assert stat.S_ISCHR(os.lstat(device).st_mode)


# -- the command line -----------------------------------------------------------------------------------------


def _cli(args, tmp_path, capsys):
    code = main(["select", "--quiet", "--cache", str(tmp_path / "c.json"), "--threads", "1", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_the_pick_provenance_and_writes_the_plot(timer, tmp_path, capsys):
    plot = tmp_path / "p.png"
    code, out, err = _cli(["--latency-ms", "12.5", "--plot", str(plot)], tmp_path, capsys)
    assert code == 0, err
    assert "pick for 12.5 ms: mobilenet_v1_0.75_224" in out and "measured now: 10 models" in out
    assert "AMD" in out or "machine:" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = _cli(["--latency-ms", "5", "--plot", str(plot)], tmp_path, capsys)
    assert code == 0 and "from the cache" in out and "measured now" not in out and len(timer.calls) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--latency-ms", "0"], "> 0"),
        (["--latency-ms", "-3"], "> 0"),
        (["--latency-ms", "nan"], "finite"),
        (["--latency-ms", "5", "--family", "v3"], "unknown family v3"),
        (["--latency-ms", "5", "--batch", "0"], "batch"),
        (["--latency-ms", "0.5"], "the fastest is mobilenet_v1_0.25_224 at 3.00 ms"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, message, timer, tmp_path, capsys):
    code, _out, err = _cli([*args, "--plot", str(tmp_path / "p.png")], tmp_path, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("where", ["below-a-file", "directory", "fifo"])
def test_cli_an_explicit_plot_path_that_cannot_be_written_is_refused_before_measuring(where, timer, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    plot = {"below-a-file": blocker / "p.png", "directory": tmp_path / "dir", "fifo": tmp_path / "fifo.png"}[where]
    code, out, err = _cli(["--latency-ms", "10", "--plot", str(plot)], tmp_path, capsys)
    assert code == 2 and "--plot" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert timer.calls == [] and out == ""  # nothing measured


def test_cli_a_default_plot_path_that_cannot_be_written_is_a_note(timer, tmp_path, capsys, monkeypatch):
    """Not asked for, the plot must not cost the measurements: where the working directory holds something else
    at the default name (or cannot be written), the table still comes, with a note."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "select_pareto.png").mkdir()
    code, out, _err = _cli(["--latency-ms", "10"], tmp_path, capsys)
    assert code == 0 and "pick for 10 ms" in out and "the plot could not be written to select_pareto.png" in out


def test_cli_refuses_a_thread_count_no_machine_could_start(timer, tmp_path, capsys):
    code = main(["select", "--quiet", "--latency-ms", "5", "--threads", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and "--threads must be an integer from 1 to" in err and timer.calls == []


def test_cli_a_corrupt_cache_is_a_note(timer, tmp_path, capsys):
    (tmp_path / "c.json").write_text("garbage")
    code, out, err = _cli(["--latency-ms", "10", "--plot", str(tmp_path / "p.png")], tmp_path, capsys)
    assert code == 0 and "could not be read" in out and "Traceback" not in err


def test_cli_json_holds_the_pick_and_every_point(timer, tmp_path, capsys):
    code, out, err = _cli(
        ["--latency-ms", "12.5", "--plot", str(tmp_path / "p.png"), "--format", "json"], tmp_path, capsys
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["pick"]["model"] == "mobilenet_v1_0.75_224"
    assert len(result["points"]) == 10


def test_auto_is_what_autotune_chooses_for_the_grids_middle_model():
    grid = [p for p in select.published_points(("v1",)) if p.alpha < 1]  # 0.75-224, 0.5-224, 0.5-160, 0.25-224
    notes: list[str] = []
    name = select._resolve_backend("auto", grid, "fp32", 1, 1, notes)
    middle = sorted(grid, key=lambda p: p.macs)[2].model
    assert name in autotune.PRECISION_CANDIDATES["fp32"] and backend_installed(name)
    assert notes == [notes[0]] and notes[0].startswith(f"auto: {name} for every model, as measured on {middle} (")


def test_bf16_selection_is_refused_where_it_cannot_run(monkeypatch):
    grid = select.published_points(("v1",))[:2]
    with pytest.raises(MobileNetError, match="give --precision bf16 too"):
        select._resolve_backend("openvino-bf16", grid, "fp32", 1, 1, [])
    monkeypatch.setattr(backends, "has_native_bf16", lambda: True)
    with pytest.raises(MobileNetError, match="timed on openvino-bf16"):
        select._resolve_backend("onnxruntime", grid, "bf16", 1, 1, [])
    monkeypatch.setattr(backends, "has_native_bf16", lambda: False)
    with pytest.raises(MobileNetError, match="AVX512-BF16 or AMX"):
        select.select_model(5.0, precision="bf16", families="v1")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("latency_ms", 10**400),  # no float: was OverflowError
        ("latency_ms", 1e300),  # no measurement takes that long: was "the fastest is ... at 1e300 ms"
        ("p90_ms", "fast"),  # passed into the JSON report as it was
        ("p90_ms", float("nan")),  # written as NaN, which is not JSON
        ("measured_at", ["yesterday"]),
        ("measured_at", "line\nbreak"),
        ("p90_ms", 1e-9),  # below its own median: was reported as it stood
    ],
    ids=[
        "latency-400-digits",
        "latency-1e300",
        "p90-text",
        "p90-nan",
        "measured-at-list",
        "measured-at-newline",
        "p90-below-median",
    ],
)
def test_an_edited_cache_entry_is_measured_again_not_trusted(timer, tmp_path, field, value):
    cache = tmp_path / "c.json"
    select.select_model(10, cache_path=cache, threads=1)
    data = json.loads(cache.read_text())
    for entry in data["entries"].values():
        entry[field] = value
    cache.write_text(json.dumps(data))
    result = select.select_model(10, cache_path=cache, threads=1)
    assert len(result.measured) == 10 and len(timer.calls) == 2
    assert all(math.isfinite(p["latency_ms"]) and p["latency_ms"] < 1e3 for p in result.points)
    json.loads(json.dumps(result.to_dict(), allow_nan=False))  # a strict JSON document
