"""Running the reproduction of the papers' trade-offs: shared and finished runs, resume, report only, CLI errors.

Training runs use the built-in digits with a tiny budget and narrow models, so the whole file takes seconds; the
experiments themselves are checked in test_reproduce_experiments.py, the report in test_reproduce_report.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_png, read_file

from mobilenet.checkpoint import load
from mobilenet.cli import main
from mobilenet.cost import count_costs
from mobilenet.errors import MobileNetError
from mobilenet.paper import PaperRow
from mobilenet.reproduce import ReproduceConfig, run_reproduce
from mobilenet.reproduce_experiments import Budget, Experiment, Row, RunSpec

SMOKE = Budget("smoke", epochs=1, batches_per_epoch=2, batch_size=16, device="cpu", threads=1, latency_runs=2)
A = RunSpec("a_v1_0.25_32px", "V1 0.25", "mobilenet_v1_1.0_224", 0.25, 32)
B = RunSpec("b_v1_0.25_24px", "V1 0.25 @24", "mobilenet_v1_1.0_224", 0.25, 24)  # the resized-data path
C = RunSpec("c_v2_0.35_32px", "V2 0.35", "mobilenet_v2_1.0_224", 0.35, 32)
ONE = Experiment(
    "one",
    "resolution",
    "test",
    (Row(A, PaperRow("p-a", 70.0, 100, 1.0)), Row(B, PaperRow("p-b", 68.0, 60, 1.0))),
    "smaller inputs lose accuracy",
    "tiny budget",
    series=True,
)
TWO = Experiment(
    "two",
    "v1 vs v2",
    "test",
    (Row(A, PaperRow("p-a", 70.0, 100, 1.0)), Row(C, PaperRow("p-c", 72.0, 50, 1.0))),
    "v2 wins",
    "tiny budget",
)


class CountingTrain:
    """Wraps the real :func:`mobilenet.train.train`, recording which runs it was asked for (and with resume?);
    ``interrupt`` names a run whose first step sends SIGINT to this process, as Ctrl-C would."""

    def __init__(self, real, interrupt: str | None = None) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.interrupt = interrupt
        self.real = real

    def __call__(self, config, **kwargs):
        key = Path(config.out).name
        self.calls.append((key, config.resume))
        if key == self.interrupt:
            inner = kwargs.get("on_step")

            def on_step(step: int) -> None:
                if inner is not None:
                    inner(step)
                if step == 1:
                    os.kill(os.getpid(), signal.SIGINT)

            kwargs["on_step"] = on_step
        return self.real(config, **kwargs)


@pytest.fixture
def counting(monkeypatch):
    import mobilenet.train

    real = mobilenet.train.train

    def install(interrupt: str | None = None) -> CountingTrain:
        counter = CountingTrain(real, interrupt)
        monkeypatch.setattr("mobilenet.reproduce.train", counter)  # the name run_reproduce calls
        return counter

    return install


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    image = decode_png(read_file(str(path)))
    return image.ndim == 3 and image.shape[1] > 100 and image.shape[2] > 100


def test_shared_model_trained_once_finished_runs_reused_and_report_written(tmp_path, counting):
    counter = counting()
    out = tmp_path / "rep"
    config = ReproduceConfig(data="digits", out=str(out), experiments=[ONE, TWO], budget=SMOKE)
    result = run_reproduce(config, progress=False, log=None)
    # A is in both experiments and is trained once; the runs go in first-appearance order.
    assert [key for key, _ in counter.calls] == [A.key, B.key, C.key]
    assert result.trained == [A.key, B.key, C.key] and not result.pending and not result.interrupted

    document = json.loads((out / "results.json").read_text())
    assert document["finished"] == document["total"] == 3
    for spec in (A, B, C):
        record = document["models"][spec.key]
        expected = count_costs(
            spec.model, alpha=spec.alpha, resolution=spec.resolution, small_input=True, num_classes=10
        )
        assert (record["macs"], record["params"]) == (expected.macs, expected.params)
        # ... and the checkpoint that was trained is that very network.
        trained = load(out / spec.key / "last.safetensors")
        assert trained.config.resolution == spec.resolution and trained.config.small_input
        assert count_costs(trained.network).macs == record["macs"]
        assert 0.0 <= record["test_top1"] <= 1.0 and record["latency_ms"] > 0
    # The resolution multiplier: the 24 px run is cheaper than the 32 px one, as the cost model says.
    assert document["models"][B.key]["macs"] < document["models"][A.key]["macs"]
    comparisons = {c["model"]: c for e in document["experiments"] for c in e["comparisons"]}
    assert comparisons[B.key]["paper_delta_points"] == -2.0
    assert comparisons[B.key]["verdict"] in ("agrees", "tie", "disagrees")

    for name in ("accuracy_vs_macs.png", "accuracy_vs_params.png", "macs_by_operator.png"):
        assert is_png(out / name), name
    markdown = (out / "results.md").read_text()
    assert "paper: -2.0 points for 0.60x MACs; here:" in markdown
    assert "3 of 3 models finished" in markdown and "smoke" in markdown

    # A second call trains nothing and touches no run.
    stamps = {spec.key: (out / spec.key / "result.json").stat().st_mtime_ns for spec in (A, B, C)}
    weights = {spec.key: (out / spec.key / "last.safetensors").stat().st_mtime_ns for spec in (A, B, C)}
    again = run_reproduce(config, progress=False, log=None)
    assert len(counter.calls) == 3
    assert again.trained == [] and again.reused == [A.key, B.key, C.key]
    assert stamps == {spec.key: (out / spec.key / "result.json").stat().st_mtime_ns for spec in (A, B, C)}
    assert weights == {spec.key: (out / spec.key / "last.safetensors").stat().st_mtime_ns for spec in (A, B, C)}

    # Another recipe in the same directory is refused rather than mixed with these runs.
    with pytest.raises(MobileNetError, match="another --out"):
        run_reproduce(
            ReproduceConfig(data="digits", out=str(out), experiments=[ONE], budget=Budget("other", 2, 2, 16)),
            progress=False,
            log=None,
        )


def test_an_interrupted_set_resumes_where_it_stopped(tmp_path, counting):
    budget = Budget("smoke2", epochs=2, batches_per_epoch=2, batch_size=16, device="cpu", threads=1, latency_runs=2)
    out = tmp_path / "rep"
    config = ReproduceConfig(data="digits", out=str(out), experiments=[ONE, TWO], budget=budget)
    first = counting(interrupt=B.key)
    stopped = run_reproduce(config, progress=False, log=None)
    assert stopped.interrupted and stopped.trained == [A.key] and stopped.pending == [B.key, C.key]
    assert (out / A.key / "result.json").exists()
    assert (out / B.key / "train_state.safetensors").exists() and not (out / B.key / "result.json").exists()
    assert not (out / C.key).exists()
    partial = json.loads((out / "results.json").read_text())  # the partial report is already there
    assert partial["finished"] == 1 and partial["models"][B.key]["status"] == "pending"
    assert is_png(out / "accuracy_vs_macs.png")
    assert first.calls == [(A.key, False), (B.key, False)]

    second = counting()
    resumed = run_reproduce(config, progress=False, log=None)
    # A is not retrained; B continues from its saved state; C starts.
    assert second.calls == [(B.key, True), (C.key, False)]
    assert resumed.trained == [B.key, C.key] and resumed.reused == [A.key] and not resumed.interrupted
    history = [json.loads(line) for line in (out / B.key / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert json.loads((out / "results.json").read_text())["finished"] == 3


def test_report_only_trains_nothing(tmp_path, counting):
    counter = counting()
    out = tmp_path / "rep"
    result = run_reproduce(
        ReproduceConfig(data="digits", out=str(out), experiments=[ONE], budget=SMOKE),
        progress=False,
        log=None,
        report_only=True,
    )
    assert counter.calls == [] and result.pending == [A.key, B.key]
    document = json.loads((out / "results.json").read_text())
    assert document["finished"] == 0 and document["models"][A.key]["test_top1"] is None
    assert is_png(out / "accuracy_vs_macs.png") and is_png(out / "macs_by_operator.png")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--experiments", "table4,table9"], "unknown experiment 'table9'"),
        (["--budget", "huge"], "unknown budget 'huge'"),
        (["--data", "/nonexistent/cifar10"], "data directory /nonexistent/cifar10 does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    args = ["reproduce", "--data", "digits", "--out", str(tmp_path / "o"), *argv]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_report_only(tmp_path, capsys):
    code = main(
        ["reproduce", "--data", "digits", "--out", str(tmp_path / "o"), "--experiments", "table5", "--report-only"]
    )
    assert code == 0
    assert "0 finished, 2 pending" in capsys.readouterr().out
    document = json.loads((tmp_path / "o" / "results.json").read_text())
    expected = count_costs("mobilenet_v1_shallow_1.0_224", resolution=32, small_input=True, num_classes=10)
    assert document["models"]["v1_shallow_1.0_32px"]["macs"] == expected.macs
    assert torch.is_tensor(decode_png(read_file(str(tmp_path / "o" / "macs_by_operator.png"))))


def test_several_seeds_train_each_model_per_seed_on_data_held_on_the_device(tmp_path, counting):
    counter = counting()
    budget = Budget(
        "smoke-seeds",
        epochs=1,
        batches_per_epoch=2,
        batch_size=16,
        device="cpu",
        threads=1,
        latency_runs=2,
        seeds=(0, 1),
        device_data=True,
    )
    out = tmp_path / "rep"
    result = run_reproduce(
        ReproduceConfig(data="digits", out=str(out), experiments=[ONE], budget=budget), progress=False, log=None
    )
    assert [key for key, _ in counter.calls] == [A.key, B.key, A.key, B.key]
    assert result.trained == [f"seed{s}/{k}" for s in (0, 1) for k in (A.key, B.key)] and not result.interrupted
    for seed in (0, 1):
        config = json.loads((out / f"seed{seed}" / A.key / "config.json").read_text())
        assert config["train_config"]["seed"] == seed and config["train_config"]["device_data"] is True
    seeds = [json.loads((out / f"seed{s}" / "results.json").read_text())["models"][A.key]["test_top1"] for s in (0, 1)]
    document = json.loads((out / "results.json").read_text())
    assert document["seeds"] == [0, 1]
    assert document["models"][A.key]["test_top1"] == pytest.approx(sum(seeds) / 2)
    assert document["models"][A.key]["top1_spread"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2)
    assert "## The papers' claims on CIFAR-10" in (out / "results.md").read_text()
    again = run_reproduce(
        ReproduceConfig(data="digits", out=str(out), experiments=[ONE], budget=budget), progress=False, log=None
    )
    assert len(counter.calls) == 4 and again.trained == []


@pytest.mark.parametrize("content", ["fifo", "[1]", '{"budget": [1]}', "deep", "budget-fifo", "budget-list"])
def test_a_run_record_or_budget_file_that_is_not_ours_neither_hangs_nor_crashes(tmp_path, counting, content):
    """A FIFO where a record belongs would block the reader forever, JSON of the wrong shape or nested too deeply
    would escape as a traceback: the run counts as unfinished and is trained again, its record (and an unreadable
    budget file) rewritten."""
    counter = counting()
    out = tmp_path / "rep"
    config = ReproduceConfig(data="digits", out=str(out), experiments=[ONE], budget=SMOKE)
    first = run_reproduce(config, progress=False, log=None)
    assert A.key in first.trained
    record, budget_file = out / A.key / "result.json", out / "budget.json"
    target = budget_file if content.startswith("budget") else record
    target.unlink()
    if target == budget_file:  # read only when a run is left to train
        record.unlink()
    if content.endswith("fifo"):
        os.mkfifo(target)
    elif content == "deep":
        target.write_text("[" * 100_000 + "]" * 100_000)
    else:
        target.write_text("[1]" if content == "budget-list" else content)
    calls_before = len(counter.calls)
    again = run_reproduce(config, progress=False, log=None)
    assert A.key in again.trained and len(counter.calls) > calls_before
    assert json.loads(record.read_text())["budget"]["training"] == SMOKE.training_fields()
    assert json.loads(budget_file.read_text())["name"] == "smoke"


def test_a_reproduce_out_is_written_by_one_process_at_a_time(tmp_path):
    """A second `reproduce` into an --out that another process is writing would train the same runs beside it."""
    out = tmp_path / "out"
    out.mkdir()
    code = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
    code += "print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = ReproduceConfig(data="digits", out=str(out), experiments=[ONE], budget=SMOKE)
        with pytest.raises(MobileNetError, match="in use by another process"):
            run_reproduce(config, progress=False, log=None, report_only=True)
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    run_reproduce(config, progress=False, log=None, report_only=True)  # free once the holder is gone
