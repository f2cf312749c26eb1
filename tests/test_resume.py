"""Kill tests: ``mobilenet train`` killed at any point (between steps, inside each file write) and resumed with
``--resume`` until done ends with the weights of an uninterrupted run, bit for bit, with the default data-loading
workers; the run directory then holds both checkpoints and no temporaries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mobilenet.checkpoint import read_state
from mobilenet.train import TrainConfig, train

SRC = Path(__file__).resolve().parents[1] / "src"
# The run: 2 epochs of 3 batches of 64 digits at 32 px with the smallest model, the default 2 workers.
RUN = ["--model", "mobilenet_v1_0.25_224", "--data", "digits", "--resolution", "32", "--epochs", "2"]
RUN += ["--batch-size", "64", "--limit-train-batches", "3", "--threads", "1", "--no-progress"]

# Runs `python -m mobilenet` with a planted kill, from MOBILENET_TEST_KILL:
#   write:FILE:N  SIGKILL inside the N-th write of FILE in this process (its temporary is complete, not renamed);
#   step:N        SIGKILL after the N-th training step of this process; sigint-step:N sends SIGINT instead.
# mobilenet.io is patched before any module that writes imports atomic_path from it.
KILLER = """
import contextlib, os, signal, sys
import mobilenet.io

kind, _, rest = os.environ.get("MOBILENET_TEST_KILL", "").partition(":")
if kind == "write":
    name, count = rest.rsplit(":", 1)
    original, seen = mobilenet.io.atomic_path, []

    @contextlib.contextmanager
    def atomic_path(path):
        with original(path) as tmp:
            yield tmp
            if os.path.basename(path) == name:
                seen.append(path)
                if len(seen) == int(count):
                    os.kill(os.getpid(), signal.SIGKILL)

    mobilenet.io.atomic_path = atomic_path
elif kind in ("step", "sigint-step"):
    import mobilenet.train

    original_step, steps = mobilenet.train._train_step, []

    def train_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == int(rest):
            os.kill(os.getpid(), signal.SIGKILL if kind == "step" else signal.SIGINT)
        return result

    mobilenet.train._train_step = train_step

from mobilenet.cli import main

raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def killer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("killer") / "killer.py"
    path.write_text(KILLER)
    return path


def run_train(
    killer: Path, out: Path, *extra: str, kill: str = "", resume: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["MOBILENET_TEST_KILL"] = kill
    command = [sys.executable, str(killer), "train", *RUN, *extra, "--out", str(out)]
    command += ["--resume"] if resume else []
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(killer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    completed = run_train(killer, out)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    """Both checkpoints present and bit-identical to the reference run's, the same metrics, no temporaries."""
    for name in ("last.safetensors", "best.safetensors"):
        ours, theirs = load_file(str(run / name)), load_file(str(reference / name))
        assert ours.keys() == theirs.keys(), name
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key}"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []


def resume_through(killer: Path, out: Path, kills: list[str], *extra: str) -> list[str]:
    """Start the run with the first kill planted, resume it with each next one, then resume to the end; returns
    what each process said on stderr/stdout."""
    said = []
    for index, kill in enumerate([*kills, ""]):
        completed = run_train(killer, out, *extra, kill=kill, resume=index > 0)
        said.append(completed.stdout + completed.stderr)
        if kill.startswith(("write:", "step:")):
            assert completed.returncode == -signal.SIGKILL, f"{kill}: {completed.stderr[-2000:]}"
        else:
            assert completed.returncode in (0, 130), f"{kill}: {completed.stderr[-2000:]}"
    return said


def test_killed_at_every_kind_of_point_resumes_to_the_uninterrupted_weights(killer, uninterrupted, tmp_path):
    out = tmp_path / "run"
    kills = [
        "write:best.safetensors:1",  # epoch 1, inside the best checkpoint: no state yet
        "step:5",  # epoch 1 saved, then killed in the middle of epoch 2
        "write:last.safetensors:1",  # epoch 2 again, inside the last checkpoint
        "write:metrics.jsonl:1",  # epoch 2 saved, killed before its metrics
        "write:curves.png:1",  # the run is done, killed inside the plot
    ]
    said = resume_through(killer, out, kills)
    assert "starting it from the beginning" in said[1]
    # Each kill inside a write left its temporary; the next process removed it.
    for index in (1, 3, 4, 5):
        assert "removed 1 temporary file" in said[index], said[index]
    assert_same_run(out, uninterrupted)
    _, info = read_state(out / "train_state.safetensors")
    assert info["epoch"] == 2 and [row["epoch"] for row in info["history"]] == [1, 2]


def test_sigint_mid_epoch_with_per_image_augmentation_in_workers_resumes_exactly(tmp_path):
    """Per-image random transforms run in the 2 workers; the resumed epoch hands its batches to other workers."""
    base = dict(
        model="mobilenet_v1_0.25_224",
        data="digits",
        resolution=32,
        epochs=2,
        batch_size=64,
        limit_train_batches=3,
        threads=1,
        batch_augment=False,
    )
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **base), progress=False, log=None)
    assert straight.epochs_done == 2

    def interrupt(step: int) -> None:
        if step == 5:  # the middle of epoch 2
            os.kill(os.getpid(), signal.SIGINT)

    first = train(TrainConfig(out=str(tmp_path / "run"), **base), progress=False, log=None, on_step=interrupt)
    assert first.interrupted
    _, info = read_state(tmp_path / "run" / "train_state.safetensors")
    assert (info["epoch"], info["step_in_epoch"]) == (1, 2)
    train(TrainConfig(out=str(tmp_path / "run"), resume=True, **base), progress=False, log=None)
    assert_same_run(tmp_path / "run", tmp_path / "straight")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill",
    [
        "write:config.json:1",
        "write:last.safetensors:1",
        "write:last.safetensors:2",
        "write:best.safetensors:1",
        "write:train_state.safetensors:1",
        "write:train_state.safetensors:2",
        "write:metrics.csv:1",
        "write:metrics.csv:2",
        "step:2",
    ],
)
def test_killed_inside_each_write_of_each_file(killer, uninterrupted, tmp_path, kill):
    resume_through(killer, tmp_path / "run", [kill])
    assert_same_run(tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_sigint_then_kills_with_per_image_augmentation(killer, tmp_path):
    extra = ("--no-batch-augment",)
    reference = tmp_path / "straight"
    assert run_train(killer, reference, *extra).returncode == 0
    resume_through(
        killer, tmp_path / "run", ["sigint-step:2", "step:3", "sigint-step:1", "write:last.safetensors:1"], *extra
    )
    assert_same_run(tmp_path / "run", reference)


def test_a_training_state_whose_header_is_nested_too_deeply_is_refused(tmp_path):
    from safetensors.torch import save_file

    from mobilenet.checkpoint import STATE_KEY
    from mobilenet.errors import MobileNetError

    path = tmp_path / "train_state.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={STATE_KEY: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(MobileNetError, match="corrupt training-state header"):
        read_state(path)
