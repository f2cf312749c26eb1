"""Training: the loop, exact resume, signals, NaN handling, fine-tuning, a two-process torchrun run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_folder
from mobilenet.checkpoint import read_state
from mobilenet.data import load_digits
from mobilenet.errors import MobileNetError
from mobilenet.models import create_model
from mobilenet.train import TrainConfig, TrainingDiverged, train

TINY = "mobilenet_v1_0.25_128"


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(
        model=TINY,
        data=str(data),
        out=str(out),
        epochs=2,
        batch_size=6,
        num_workers=0,
        val_fraction=0.25,
        seed=3,
        resolution=32,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "data")


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(MobileNetError, match="batch-size"):
        tiny_config(tmp_path, tmp_path, batch_size=0)
    with pytest.raises(MobileNetError, match="--lr"):
        tiny_config(tmp_path, tmp_path, lr=-0.1)
    with pytest.raises(MobileNetError, match="--optimizer"):
        tiny_config(tmp_path, tmp_path, optimizer="lbfgs")
    with pytest.raises(MobileNetError, match="--ema-decay"):
        tiny_config(tmp_path, tmp_path, ema_decay=1.5)


def test_config_refuses_values_of_the_wrong_type(tmp_path):
    """The API takes what the CLI's parser never gives: lr="0.1" was a TypeError, hflip="no" turned flips on, and
    out=None a TypeError deep in the run."""
    cases = {
        "lr": ("0.1", "--lr must be a number"),
        "warmup_epochs": ("1", "--warmup-epochs must be a number"),
        "ema_decay": ("0.5", "--ema-decay must be a number"),
        "crop_scale_min": ("0.5", "crop_scale_min must be a number"),
        "hflip": ("no", "hflip must be True, False or None"),
        "small_input": ("yes", "small_input must be True, False or None"),
        "channels_last": (0, "channels_last must be True, False or None"),
        "resume": ("no", "resume must be True or False"),
        "freeze_backbone": (1, "freeze_backbone must be True or False"),
        "out": (None, "out must be a non-empty path"),
        "data": (b"data", "data must be a non-empty path"),
        "init": (5, "init must be a non-empty path"),
    }
    for name, (value, words) in cases.items():
        options = tiny_config(tmp_path, tmp_path / "run").to_dict()
        with pytest.raises(MobileNetError, match=re.escape(words)):
            TrainConfig(**{**options, name: value})


def test_config_takes_paths_as_paths(data_dir, tmp_path):
    """A Path as the data or the run directory (as any Python caller writes) crashed on writing config.json."""
    config = tiny_config(data_dir, tmp_path / "run", epochs=1, limit_train_batches=1)
    config = TrainConfig(**{**config.to_dict(), "data": data_dir, "out": tmp_path / "run"})
    assert (config.data, config.out) == (str(data_dir), str(tmp_path / "run"))
    assert train(config, progress=False, log=None).epochs_done == 1


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def test_resume_after_sigint_matches_uninterrupted_run(data_dir, tmp_path):
    straight = train(tiny_config(data_dir, tmp_path / "straight", ema_decay=0.9), progress=False, log=None)
    assert straight.epochs_done == 2 and not straight.interrupted

    def interrupt(step: int) -> None:
        if step == 4:  # the middle of epoch 2 (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    first = train(
        tiny_config(data_dir, tmp_path / "resumed", ema_decay=0.9), progress=False, log=None, on_step=interrupt
    )
    assert first.interrupted and first.epochs_done == 1
    _, info = read_state(tmp_path / "resumed" / "train_state.safetensors")
    assert (info["epoch"], info["step_in_epoch"]) == (1, 1)
    second = train(tiny_config(data_dir, tmp_path / "resumed", ema_decay=0.9, resume=True), progress=False, log=None)
    assert second.epochs_done == 2 and not second.interrupted
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The metrics hold each epoch exactly once, equal to the uninterrupted run's.
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["val_top1"] == straight.history[1]["val_top1"]
    assert (tmp_path / "resumed" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss")


def test_checkpoint_is_loadable_with_classes_and_preprocessing(data_dir, tmp_path):
    from mobilenet.checkpoint import load

    result = train(tiny_config(data_dir, tmp_path / "run", epochs=1), progress=False, log=None)
    model = load(result.best_checkpoint)
    assert model.classes == ["a", "b", "c"]
    assert model.preprocessing["input_size"] == 32 and model.preprocessing["style"] == "small"
    assert model.config.small_input and model.config.num_classes == 3
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == TINY and config["classes"] == ["a", "b", "c"]


def test_refuses_to_overwrite_or_resume_wrong_model(data_dir, tmp_path):
    train(tiny_config(data_dir, tmp_path / "run", epochs=1), progress=False, log=None)
    with pytest.raises(MobileNetError, match="already holds a run"):
        train(tiny_config(data_dir, tmp_path / "run", epochs=1), progress=False, log=None)
    with pytest.raises(MobileNetError, match=r"is a run of mobilenet_v1_0\.25_128"):
        train(
            tiny_config(data_dir, tmp_path / "run", model="mobilenet_v1_0.5_128", resume=True), progress=False, log=None
        )
    with pytest.raises(MobileNetError, match="no train_state"):
        train(tiny_config(data_dir, tmp_path / "other", resume=True), progress=False, log=None)
    with pytest.raises(MobileNetError, match="larger than the training set"):
        train(tiny_config(data_dir, tmp_path / "big", batch_size=500), progress=False, log=None)


def test_resume_with_other_options_or_data_is_refused(data_dir, tmp_path):
    """A resume with another seed (the held-out split moved images into training), batch size or recipe went on
    silently as another run; one on other data with as many classes trained into checkpoints labelled with its
    names."""
    run = tmp_path / "run"
    train(tiny_config(data_dir, run, epochs=1, limit_train_batches=1), progress=False, log=None)
    state = (run / "train_state.safetensors").read_bytes()
    renamed = tiny_folder(tmp_path / "renamed", classes=("a", "b", "z"))
    cases = [
        ({"seed": 4}, "--seed 3 (now 4)"),
        ({"batch_size": 3}, "--batch-size 6 (now 3)"),
        ({"lr": 0.5}, "--lr (not given) (now 0.5)"),
        ({"optimizer": "adamw", "val_fraction": 0.5}, "--val-fraction 0.25 (now 0.5); --optimizer"),
        ({"batch_augment": False}, "--[no-]batch-augment True (now False)"),
        ({"data": renamed}, "class 2 'c' (now 'z' in the --data)"),
    ]
    for options, words in cases:
        data = options.pop("data", data_dir)
        config = tiny_config(data, run, epochs=2, limit_train_batches=1, resume=True, **options)
        with pytest.raises(MobileNetError, match="only --epochs, the device") as error:
            train(config, progress=False, log=None)
        assert words in str(error.value)
        assert (run / "train_state.safetensors").read_bytes() == state
    # What may change: --epochs, the device, threads and workers.
    config = tiny_config(data_dir, run, epochs=2, limit_train_batches=1, resume=True, num_workers=1, threads=1)
    assert train(config, progress=False, log=None).epochs_done == 2


def test_a_split_with_an_empty_set_is_refused_before_training(tmp_path):
    """Classes of one image each left nothing to hold out: the run trained an epoch, then stopped on 'the evaluation
    set is empty'; a --val-fraction that held out every image was called a batch larger than the training set."""
    single = tiny_folder(tmp_path / "single", per_class=1)
    with pytest.raises(MobileNetError, match=r"validation set of single is empty.*or a val/ folder beside train/"):
        train(tiny_config(single, tmp_path / "run", batch_size=1), progress=False, log=None)
    assert not (tmp_path / "run").exists()
    data = tiny_folder(tmp_path / "data", per_class=3)
    with pytest.raises(MobileNetError, match=r"training set of data is empty.*all its 9 images.*--val-fraction"):
        train(tiny_config(data, tmp_path / "run", batch_size=1, val_fraction=0.9), progress=False, log=None)
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    holder = {}

    def poison(step: int) -> None:
        if step == 4:  # after epoch 1's checkpoint: corrupt the weights so the next loss is NaN
            with torch.no_grad():
                holder["model"].classifier.weight.fill_(float("nan"))

    import mobilenet.train as train_module

    original = train_module.build_optimizer

    def capture(model, recipe):
        holder["model"] = model
        return original(model, recipe)

    train_module.build_optimizer = capture
    try:
        with pytest.raises(TrainingDiverged, match=r"loss became nan.*last good checkpoint is kept.*epoch 1"):
            train(tiny_config(data_dir, run, epochs=3), progress=False, log=None, on_step=poison)
    finally:
        train_module.build_optimizer = original
    weights = load_file(str(run / "last.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    _, info = read_state(run / "train_state.safetensors")
    assert info["epoch"] == 1


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_to_end(data_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "mobilenet", "train"]
    command += ["--model", TINY, "--data", str(data_dir), "--out", str(out), "--epochs", "1", "--batch-size", "6"]
    command += ["--resolution", "32", "--num-workers", "0", "--val-fraction", "0.25", "--threads", "1", "--no-progress"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    _, info = read_state(out / "train_state.safetensors")
    assert info["world_size"] == 2


def test_init_fine_tunes_from_a_checkpoint(data_dir, tmp_path):
    from mobilenet.checkpoint import save
    from mobilenet.train import initialise_from

    # A donor with 5 classes: its body is copied, its head is not (the tiny data has 3 classes).
    torch.manual_seed(1)
    donor = create_model(TINY, num_classes=5, resolution=64)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(torch.randn_like(p))
    path = save(donor, tmp_path / "donor.safetensors")
    model = create_model(TINY, num_classes=3, resolution=32, small_input=True)
    fresh_head = model.classifier.weight.clone()
    notes = initialise_from(model, str(path))
    assert "classifier starts fresh" in notes[-1]
    assert torch.equal(model.features[3].depthwise.conv.weight, donor.features[3].depthwise.conv.weight)
    assert torch.equal(model.classifier.weight, fresh_head)

    # Same classes: the head is copied too.
    same = create_model(TINY, num_classes=5)
    initialise_from(same, str(path))
    assert torch.equal(same.classifier.weight, donor.classifier.weight)

    # Another width does not fit, and the error names a mis-shaped tensor.
    with pytest.raises(MobileNetError, match="does not fit"):
        initialise_from(create_model("mobilenet_v1_0.5_128", num_classes=3), str(path))
    with pytest.raises(MobileNetError, match="is not a file"):
        initialise_from(create_model(TINY), str(tmp_path / "missing.safetensors"))

    # Through train(): the first epoch starts from the donor's body, so its first-layer weights are not the
    # random initialisation's (which a run without --init gets from the same seed).
    # The donor ran at the paper's strides: at 32 px the run must say whether to keep them.
    config = tiny_config(data_dir, tmp_path / "ft", epochs=1, init=str(path), small_input=True)
    run = train(config, progress=False, log=None)
    scratch = train(tiny_config(data_dir, tmp_path / "scratch", epochs=1), progress=False, log=None)
    tuned = load_file(run.last_checkpoint)["features.0.conv.weight"]
    baseline = load_file(scratch.last_checkpoint)["features.0.conv.weight"]
    assert (tuned - donor.features[0].conv.weight).abs().max() < (baseline - donor.features[0].conv.weight).abs().max()


def _capture_model(monkeypatch) -> dict:
    """The model train() builds, for tests that tamper with it mid-run."""
    import mobilenet.train as train_module

    holder: dict = {}
    original = train_module.build_optimizer

    def capture(model, recipe):
        holder["model"] = model
        return original(model, recipe)

    monkeypatch.setattr(train_module, "build_optimizer", capture)
    return holder


def test_nan_validation_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    holder = _capture_model(monkeypatch)
    run = tmp_path / "run"

    def poison(step: int) -> None:
        if step == 4:  # epoch 2: BatchNorm's running statistics turn NaN, the training losses stay finite
            batch_norm = next(m for m in holder["model"].modules() if isinstance(m, torch.nn.BatchNorm2d))
            batch_norm.running_var.fill_(float("nan"))

    with pytest.raises(
        TrainingDiverged, match=r"validation loss became nan after epoch 2.*last good checkpoint is kept.*1"
    ):
        train(tiny_config(data_dir, run, epochs=3), progress=False, log=None, on_step=poison)
    weights = load_file(str(run / "last.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    _, info = read_state(run / "train_state.safetensors")
    assert info["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_weights_files_are_written_before_the_state_that_records_them(data_dir, tmp_path, monkeypatch):
    import mobilenet.train as train_module

    original = train_module.save_weights

    def crash_on_best(model, path, **kwargs):
        if Path(path).name == "best.safetensors":
            raise RuntimeError("killed while writing best.safetensors")
        return original(model, path, **kwargs)

    monkeypatch.setattr(train_module, "save_weights", crash_on_best)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_config(data_dir, tmp_path / "run", epochs=1), progress=False, log=None)
    # No state claims an epoch whose best checkpoint does not exist: a resume trains epoch 1 again.
    assert not (tmp_path / "run" / "train_state.safetensors").exists()
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_resume_rewrites_a_missing_or_wrong_best_checkpoint_from_the_state(data_dir, tmp_path):
    from mobilenet.checkpoint import save

    run = tmp_path / "run"
    train(tiny_config(data_dir, run, epochs=1), progress=False, log=None)
    best = load_file(str(run / "best.safetensors"))
    for damage in ("delete", "other weights"):
        if damage == "delete":
            (run / "best.safetensors").unlink()
        else:
            save(create_model(TINY, num_classes=3, resolution=32, small_input=True), run / "best.safetensors")
        said: list[str] = []
        result = train(tiny_config(data_dir, run, epochs=1, resume=True), progress=False, log=said.append)
        assert result.best_checkpoint is not None
        assert any(line.startswith(f"repaired {run / 'best.safetensors'}") for line in said), said
        repaired = load_file(str(run / "best.safetensors"))
        assert repaired.keys() == best.keys() and all(torch.equal(repaired[k], best[k]) for k in best)


def test_resume_says_which_best_checkpoint_it_cannot_rebuild(data_dir, tmp_path):
    run = tmp_path / "run"

    def interrupt(step: int) -> None:
        if step == 4:  # the middle of epoch 2: the state's weights are no longer epoch 1's
            os.kill(os.getpid(), signal.SIGINT)

    train(tiny_config(data_dir, run), progress=False, log=None, on_step=interrupt)
    (run / "best.safetensors").unlink()
    said: list[str] = []
    train(tiny_config(data_dir, run, resume=True), progress=False, log=said.append)
    warning = [line for line in said if line.startswith("warning:")]
    assert len(warning) == 1 and "best.safetensors is missing: it should hold the weights of epoch 1" in warning[0]


def test_a_folder_of_32_px_images_trains_at_32_px(data_dir, tmp_path):
    """Without --resolution, a folder whose images are all 32x32 trains at 32 px (not the model's 224) and says so;
    a folder of mixed sizes falls back to the model's resolution."""
    lines: list[str] = []
    config = tiny_config(data_dir, tmp_path / "run", resolution=None, epochs=1)
    train(config, progress=False, log=lines.append)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_config"]["resolution"] == 32 and saved["model_config"]["small_input"] is True
    assert any("resolution: 32 px, the data's image size" in line for line in lines)

    from mobilenet.data import uniform_small_size

    files = sorted(data_dir.rglob("*.png"))
    assert uniform_small_size(files) == 32
    odd = tiny_folder(tmp_path / "odd" / "x", classes=("a",), per_class=1, size=40)
    assert uniform_small_size([*files, *sorted(odd.rglob("*.png"))]) is None


def test_fine_tuning_defaults(data_dir, tmp_path):
    """--init: a tenth of the recipe's learning rate, never a silent small_input under published weights, and
    --freeze-backbone trains the classifier only."""
    from mobilenet.checkpoint import load

    first = train(tiny_config(data_dir, tmp_path / "a", epochs=1), progress=False, log=None)
    lines: list[str] = []
    tuned = train(
        tiny_config(data_dir, tmp_path / "b", epochs=1, init=str(first.last_checkpoint), freeze_backbone=True),
        progress=False,
        log=lines.append,
    )
    assert any("learning rate 0.00046875 (0.1 of the recipe's" in line for line in lines)  # 0.1 * 6 / 128 / 10
    before, after = load(first.last_checkpoint), load(tuned.last_checkpoint)
    for (name, a), b in zip(before.features.state_dict().items(), after.features.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(before.classifier.weight, after.classifier.weight)
    with pytest.raises(MobileNetError, match=r"pass --small-input .* or --no-small-input"):
        train(tiny_config(data_dir, tmp_path / "c", init="torchvision", model="mobilenet_v2_1.0_224"), log=None)
    with pytest.raises(MobileNetError, match="--freeze-backbone needs --init"):
        tiny_config(data_dir, tmp_path / "d", freeze_backbone=True)


def test_digits_are_not_flipped_by_default():
    from mobilenet.data import load_digits
    from mobilenet.train import _hflip

    digits = load_digits()
    assert _hflip(TrainConfig(model=TINY, data="digits", out="x"), digits) is False
    assert _hflip(TrainConfig(model=TINY, data="digits", out="x", hflip=True), digits) is True
    assert _hflip(TrainConfig(model=TINY, data="d", out="x"), dataclasses.replace(digits, name="folder")) is True


def _digits_config(out: Path, **overrides) -> TrainConfig:
    base = dict(
        model=TINY,
        data="digits",
        out=str(out),
        epochs=2,
        batch_size=32,
        num_workers=0,
        seed=5,
        limit_train_batches=3,
        threads=1,
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_device_data_trains_the_same_weights_as_the_data_loader(tmp_path):
    """Images held on the device (here the CPU: the same code as on a GPU) give the DataLoader's batches, crops and
    flips: the weights are equal bit for bit, and validation on the device agrees."""
    digits = load_digits()
    loader = train(_digits_config(tmp_path / "loader", device_data=False), progress=False, log=None, data=digits)
    lines: list[str] = []
    device = train(_digits_config(tmp_path / "device", device_data=True), progress=False, log=lines.append, data=digits)
    assert any("images held on the device" in line for line in lines)
    a, b = _final_weights(tmp_path / "loader"), _final_weights(tmp_path / "device")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for ours, theirs in zip(device.history, loader.history, strict=True):
        assert ours["train_loss"] == theirs["train_loss"]
        assert ours["val_top1"] == pytest.approx(theirs["val_top1"], abs=1 / 360)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)


def test_device_data_resumes_mid_epoch_exactly(tmp_path):
    digits = load_digits()
    config = _digits_config(tmp_path / "straight", device_data=True)
    train(config, progress=False, log=None, data=digits)

    def interrupt(step: int) -> None:
        if step == 4:  # batch 1 of epoch 2 (3 batches per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    resumed = dataclasses.replace(config, out=str(tmp_path / "resumed"))
    first = train(resumed, progress=False, log=None, on_step=interrupt, data=digits)
    assert first.interrupted
    train(dataclasses.replace(resumed, resume=True), progress=False, log=None, data=digits)
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding ``directory``'s flock, as a second `mobilenet train` into it would (plain fcntl: the
    lock is the system's, not something of ours that a test could fake)."""
    code = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
    code += "print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_directory_is_written_by_one_process_at_a_time(data_dir, tmp_path):
    """Two `train` processes into one --out (a second terminal, or a --resume while the run still goes) wrote the
    same checkpoints and state in turns. The second is refused at once and changes nothing; once the first ends,
    however it ends (here kill -9), the run resumes."""
    run = tmp_path / "run"
    train(tiny_config(data_dir, run, epochs=1), progress=False, log=None)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    holder = _hold_lock(run)
    try:
        with pytest.raises(MobileNetError, match=r"--out .*run is in use by another process .* choose another --out"):
            train(tiny_config(data_dir, run, epochs=2, resume=True), progress=False, log=None)
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        other = _hold_lock(fresh)
        try:
            with pytest.raises(MobileNetError, match="in use by another process"):
                train(tiny_config(data_dir, fresh, epochs=1), progress=False, log=None)
        finally:
            other.kill()
            other.wait()
        assert fresh.is_dir() and list(fresh.iterdir()) == []  # the holder's directory: left as it was
        assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    finally:
        holder.kill()  # SIGKILL: the system drops its lock
        holder.wait()
    result = train(tiny_config(data_dir, run, epochs=2, resume=True), progress=False, log=None)
    assert read_state(run / "train_state.safetensors")[1]["epoch"] == 2 and result.best_checkpoint.is_file()
