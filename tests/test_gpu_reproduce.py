"""The GPU run prepared on the CPU: the CIFAR-10 pack script, the epoch fitting, and the whole script rehearsed on
a tiny pack of generated images (benchmarks/pack_cifar10.py, benchmarks/gpu_reproduce.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.io import decode_jpeg, encode_jpeg

from conftest import PROJECT_ROOT
from mobilenet.data import load_data
from test_benchmarks import load_script

CLASSES = [f"class{i}" for i in range(10)]


def jpeg_tree(root: Path, *, train: int, test: int) -> Path:
    """A CIFAR-10-shaped tree: 10 class folders of 32x32 JPEGs (a colour per class plus noise) in train/ and test/."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                base = torch.zeros(3, 32, 32)
                base[label % 3] = 0.3 + 0.06 * label
                image = ((base + 0.3 * torch.rand(3, 32, 32, generator=g)) * 255).clamp(0, 255).to(torch.uint8)
                (root / split / name / f"{i:04d}.jpg").write_bytes(bytes(encode_jpeg(image).numpy()))
    return root


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "benchmarks" / "gpu_reproduce.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory) -> Path:
    root = jpeg_tree(tmp_path_factory.mktemp("cifar") / "tree", train=4, test=2)
    out = root.parent / "tiny.pack"
    summary = load_script("pack_cifar10").pack_folder(root, out)
    assert (summary["train"], summary["test"], summary["classes"]) == (40, 20, CLASSES)
    return out


def test_the_pack_holds_every_jpeg_unchanged_and_decodes_to_the_same_pixels(tiny_pack):
    bundle = load_data(str(tiny_pack))
    tree = tiny_pack.parent / "tree"
    first = decode_jpeg(
        torch.frombuffer(bytearray((tree / "train" / "class3" / "0000.jpg").read_bytes()), dtype=torch.uint8)
    )
    assert torch.equal(bundle.train.images[12], first) and int(bundle.train.labels[12]) == 3
    assert bundle.classes == CLASSES and bundle.val_name == "test" and bundle.native_size == 32
    assert tiny_pack.stat().st_size < 60 * 2**20


def test_epochs_are_fitted_to_the_time_left():
    script = load_script("gpu_reproduce")
    # Two models: 0.5 s and 1.5 s of training per 500-image epoch, plus 0.25 s outside training each: 2.5 s an
    # epoch of the set, 5 s with 2 seeds.
    measured = {
        "a": {"images_per_s": 1000.0, "overhead_s_per_epoch": 0.25, "train_images": 500},
        "b": {"images_per_s": 1000 / 3, "overhead_s_per_epoch": 0.25, "train_images": 500},
    }
    args = SimpleNamespace(
        batch_size=100, limit_batches=None, time_budget_s=script.elapsed() + 62, reserve_s=10, max_epochs=60
    )
    epochs, epoch_s = script.fit_epochs(args, measured, 2)
    assert epoch_s == pytest.approx(5.0) and epochs == 10
    args.limit_batches = 1  # a capped epoch: 1 batch of 100 images
    assert script.fit_epochs(args, measured, 2)[1] == pytest.approx(2 * (0.1 + 0.3 + 0.5))
    args.time_budget_s = 0  # no time left: still one epoch (the deadline then stops it)
    assert script.fit_epochs(args, measured, 2)[0] == 1


def test_a_deadline_during_the_probe_trains_nothing_and_says_so(tiny_pack, tmp_path):
    done = run_script("--pack", str(tiny_pack), "--out", str(tmp_path / "out"), "--time-budget-s", "1", timeout=120)
    assert done.returncode == 1, done.stderr
    assert "did not finish within 1 s: nothing trained" in done.stdout
    assert json.loads((tmp_path / "out" / "gpu_run.json").read_text())["probe_finished"] is False


@pytest.mark.slow
def test_cpu_rehearsal_probes_fits_trains_two_seeds_and_reports(tiny_pack, tmp_path):
    out = tmp_path / "out"
    budget = 240
    done = run_script(
        "--pack", str(tiny_pack), "--out", str(out), "--time-budget-s", str(budget), "--experiments", "table5",
        "--batch-size", "8", "--probe-batches", "1", "--limit-batches", "2", "--max-epochs", "2",
        timeout=budget + 60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "gpu_run.json").read_text())
    assert set(summary["probe"]) == {"v1_0.75_32px", "v1_shallow_1.0_32px"}
    assert all(m["images_per_s"] > 0 for m in summary["probe"].values())
    assert summary["epochs"] == 2 and not summary["interrupted"] and summary["timings"]["total_s"] < budget
    document = json.loads((out / "results.json").read_text())
    assert document["seeds"] == [0, 1] and document["finished"] == 2
    assert document["claims"][0]["verdict"] in ("agrees", "disagrees", "inconclusive")
    rows = [json.loads(line) for line in (out / "metrics_all.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and {row["seed"] for row in rows} == {0, 1}
    assert not list(out.rglob("*.safetensors"))
    for name in ("results.md", "accuracy_vs_macs.png", "seed1/v1_shallow_1.0_32px/metrics.csv"):
        assert (out / name).is_file(), name


def _tree_missing_a_test_class(root: Path) -> None:
    jpeg_tree(root, train=1, test=1)
    (root / "test" / "class9").rename(root / "moved")


def _tree_with_a_gif(root: Path) -> None:
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
    (root / "train" / "a" / "0.jpg").write_bytes(b"GIF89a not a jpeg")


@pytest.mark.parametrize(
    "make_tree, extra, words",
    [
        (lambda root: None, [], "not a folder"),  # no train/ or test/
        (_tree_missing_a_test_class, [], "lacks the classes ['class9']"),
        (lambda root: jpeg_tree(root, train=1, test=1), ["--max-mib", "0.000001"], "nothing written"),
        (lambda root: jpeg_tree(root, train=1, test=1), ["--out", "/proc/x.pack"], "cannot write the pack"),
        (_tree_with_a_gif, [], "not a JPEG"),
    ],
)
def test_the_pack_script_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, make_tree, extra, words):
    root = tmp_path / "tree"
    root.mkdir()
    make_tree(root)
    out = tmp_path / "p.pack"
    argv = ["--src", str(root), "--out", str(out), *extra]
    assert load_script("pack_cifar10").main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("limit", ["0", "-1", "x"])
def test_the_pack_script_refuses_a_limit_that_is_not_a_positive_count(tmp_path, capsys, limit):
    """--limit -1 used to slice off each class's last image and overwrite the default pack."""
    with pytest.raises(SystemExit) as stop:
        load_script("pack_cifar10").main(["--src", str(tmp_path), "--out", str(tmp_path / "p.pack"), "--limit", limit])
    assert stop.value.code == 2 and "--limit" in capsys.readouterr().err
    assert not (tmp_path / "p.pack").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        # were ValueError tracebacks
        (["--seeds", "a"], "--seeds"),
        (["--seeds", ","], "--seeds"),
        # were accepted, then "the probe did not finish": nothing trained, exit 1
        (["--batch-size", "0"], "--batch-size"),
        (["--probe-batches", "0"], "--probe-batches"),
        (["--time-budget-s", "-5"], "--time-budget-s"),
        (["--time-budget-s", "nan"], "--time-budget-s"),
        (["--reserve-s", "inf"], "--reserve-s"),
        # was a MobileNetError traceback after the imports
        (["--experiments", "nope"], "unknown experiment 'nope'"),
    ],
)
def test_the_gpu_script_refuses_bad_options_before_any_work(tiny_pack, tmp_path, capsys, extra, words):
    argv = ["--pack", str(tiny_pack), "--out", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as stop:
        load_script("gpu_reproduce").run_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and words in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pack", ["missing.pack", "damaged.pack"])
def test_the_gpu_script_names_a_missing_or_damaged_pack_in_one_line(tmp_path, capsys, pack):
    """A missing pack was a MobileNetError traceback; a damaged one is the reader's one line."""
    if pack == "damaged.pack":
        (tmp_path / pack).write_bytes(b"MNPACK01" + b"\xff" * 8)
    argv = ["--pack", str(tmp_path / pack), "--out", str(tmp_path / "out"), "--time-budget-s", "60"]
    try:
        code = load_script("gpu_reproduce").run_main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and pack in err.splitlines()[-1]
