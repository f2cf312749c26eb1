"""The reproduction of the papers' trade-offs on one GPU, in one command that ends within a time budget.

The GPU machine receives only the working tree, so CIFAR-10 comes as one image pack (``python
benchmarks/pack_cifar10.py`` writes ``gpu_run/cifar10.pack``, 53.6 MiB). This script:

1. probes every model: ``mobilenet reproduce``'s own training (images held on the device, batch augmentation there,
   bf16 autocast, channels_last) for 2 short epochs of ``--probe-batches`` batches, and reads the second epoch's
   images/s and each run's time outside training (validation, checkpoints, latency);
2. fits the number of whole epochs to the time left (the same epochs for every model and seed; it says how many it
   could afford against the ``--target-epochs``);
3. trains the set once per seed under ``OUT/seed<N>/`` and writes ``OUT/results.md``, ``OUT/results.json`` (each
   model's mean and spread over the seeds, a verdict per claim of the papers), the plots, every run's per-epoch
   ``metrics.jsonl``/``metrics.csv``, ``OUT/metrics_all.jsonl`` (all of them, one row per epoch) and
   ``OUT/gpu_run.json`` (what was measured and decided).

A timer sends SIGINT at the deadline: the run in progress saves its state and the report is written from the runs
that finished, so the results are on disk before the command's time limit. Checkpoints are deleted at the end unless
``--keep-checkpoints`` (they would not fit what comes back from the machine).

    python benchmarks/gpu_reproduce.py --pack gpu_run/cifar10.pack --out "$OUT/reproduce" --time-budget-s 540

Rehearsal on a CPU (docs/reproduce.md): a small pack and a tiny budget,

    python benchmarks/pack_cifar10.py --limit 20 --out gpu_run/rehearsal.pack
    python benchmarks/gpu_reproduce.py --pack gpu_run/rehearsal.pack --out /tmp/rehearsal --time-budget-s 60 \\
        --experiments table5 --batch-size 16 --probe-batches 2 --limit-batches 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mobilenet.errors import MobileNetError
from mobilenet.pack import read_pack
from mobilenet.reproduce import BUDGETS, ReproduceConfig, plan_runs, run_reproduce, select_experiments


def process_age_s() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): the budget counts the interpreter's start-up and
    the imports of torch too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


STARTED = time.perf_counter() - process_age_s()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", required=True, help="the CIFAR-10 image pack (benchmarks/pack_cifar10.py)")
    parser.add_argument("--out", required=True, help="the output folder")
    parser.add_argument("--time-budget-s", type=seconds, default=540.0, help="the whole script ends within this")
    parser.add_argument("--experiments", default=None, help="as mobilenet reproduce (default: all but table8)")
    parser.add_argument("--seeds", type=seed_list, default="0,1", help="comma-separated seeds, each trains the set")
    parser.add_argument("--batch-size", type=count, default=BUDGETS["gpu"].batch_size)
    parser.add_argument("--probe-batches", type=count, default=6, help="batches per probe epoch (2 epochs per model)")
    parser.add_argument("--limit-batches", type=count, default=None, help="cap every epoch (rehearsals)")
    parser.add_argument("--target-epochs", type=count, default=15, help="what the budget aims for (reported)")
    parser.add_argument("--max-epochs", type=count, default=60)
    parser.add_argument("--reserve-s", type=seconds, default=15.0, help="kept for the report and the clean-up")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep-checkpoints", action="store_true")
    args = parser.parse_args(argv)
    if not Path(args.pack).is_file():
        parser.error(f"--pack {args.pack}: not a file; expected the pack benchmarks/pack_cifar10.py writes")
    try:
        select_experiments(args.experiments)
    except MobileNetError as error:
        parser.error(f"--experiments: {error}")
    return args


def count(text: str) -> int:
    """A positive whole number (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def seconds(text: str) -> float:
    """A finite, non-negative number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def seed_list(text: str) -> list[int]:
    """Comma-separated seeds, at least one, each a whole number from 0 to 2**63 - 1 (argparse type)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(not 0 <= seed < 2**63 for seed in seeds):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of seeds (whole numbers >= 0)")
    return seeds


def elapsed() -> float:
    return time.perf_counter() - STARTED


def probe(args: argparse.Namespace, out: Path) -> dict[str, dict[str, float]] | None:
    """Each model's steady images/s (the second probe epoch's) and its seconds outside training per epoch; None
    when the deadline stopped the probe first."""
    budget = replace(
        BUDGETS["gpu"],
        name="probe",
        epochs=2,
        batches_per_epoch=args.probe_batches,
        batch_size=args.batch_size,
        seeds=None,
        device=args.device,
    )
    config = ReproduceConfig(data=args.pack, out=str(out), experiments=args.experiments, budget=budget)
    try:
        result = run_reproduce(config, progress=False, log=None)
    except KeyboardInterrupt:
        return None
    if result.interrupted or result.pending:
        return None
    measured = {}
    for key, record in result.results["models"].items():
        rows = [json.loads(line) for line in (out / key / "metrics.jsonl").read_text().splitlines()]
        measured[key] = {
            "images_per_s": rows[-1]["images_per_s"],
            "overhead_s_per_epoch": max(0.0, record["wall_seconds"] - record["train_seconds"]) / len(rows),
            "train_images": record["train_images"],
        }
    return measured


def fit_epochs(args: argparse.Namespace, measured: dict[str, dict[str, float]], seeds: int) -> tuple[int, float]:
    """The most whole epochs every model and seed can train in the time left, and one epoch of the set's seconds."""
    steps = min(next(iter(measured.values()))["train_images"] // args.batch_size, args.limit_batches or 10**9)
    epoch_s = (
        sum(steps * args.batch_size / m["images_per_s"] + m["overhead_s_per_epoch"] for m in measured.values()) * seeds
    )
    left = args.time_budget_s - elapsed() - args.reserve_s
    return max(1, min(args.max_epochs, int(left // epoch_s))), epoch_s


class Deadline:
    """From ``deadline_s`` after the start, SIGINT to this process every second until cancelled: a signal that
    lands during a run's last validation is absorbed by that run (which has nothing left to stop), so it is sent
    again until the set stops (a run between batches saves its state; elsewhere it is a KeyboardInterrupt)."""

    def __init__(self, deadline_s: float) -> None:
        self.cancelled = threading.Event()
        self.deadline_s = deadline_s
        self.thread = threading.Thread(target=self._signal, daemon=True)

    def start(self) -> Deadline:
        self.thread.start()
        return self

    def _signal(self) -> None:
        if self.cancelled.wait(max(0.0, self.deadline_s - elapsed())):
            return
        while not self.cancelled.is_set():
            os.kill(os.getpid(), signal.SIGINT)
            self.cancelled.wait(1.0)

    def cancel(self) -> None:
        self.cancelled.set()


def collect_metrics(out: Path, seeds: list[int]) -> int:
    """Every run's per-epoch rows, with the seed and model, in ``OUT/metrics_all.jsonl``; returns how many."""
    rows = []
    for seed in seeds:
        for path in sorted((out / f"seed{seed}").glob("*/metrics.jsonl")):
            for line in path.read_text().splitlines():
                rows.append({"seed": seed, "model": path.parent.name, **json.loads(line)})
    (out / "metrics_all.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def remove_checkpoints(out: Path) -> int:
    removed = 0
    for path in out.rglob("*.safetensors"):
        path.unlink()
        removed += 1
    return removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    read_pack(args.pack)  # a damaged pack is refused here, before the deadline and the probe start
    out = Path(args.out)
    seeds = args.seeds
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest convolutions once
    timings: dict[str, float] = {"startup_s": elapsed()}
    deadline = Deadline(args.time_budget_s - args.reserve_s)
    try:  # a deadline that has passed fires at once, possibly before the probe starts
        deadline.start()
        # Already past the deadline: no probe at all (the timer's signal could otherwise arrive after the probe
        # has started and failed on something else).
        measured = probe(args, out / "probe") if elapsed() < args.time_budget_s - args.reserve_s else None
    except KeyboardInterrupt:
        measured = None
    timings["probe_s"] = elapsed() - timings["startup_s"]
    if measured is None:
        deadline.cancel()
        out.mkdir(parents=True, exist_ok=True)
        summary = {"device": describe_device(args.device), "probe_finished": False, "timings": timings}
        (out / "gpu_run.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"the probe of the models did not finish within {args.time_budget_s:g} s: nothing trained", flush=True)
        return 1
    epochs, epoch_s = fit_epochs(args, measured, len(seeds))
    sizing = (
        f"fitted on {describe_device(args.device)}: {len(measured)} models x {len(seeds)} seeds in "
        f"{args.time_budget_s:g} s; probed {args.probe_batches}-batch epochs gave {epoch_s:.1f} s per epoch of the "
        f"whole set, so {epochs} epochs (target {args.target_epochs})"
    )
    print(sizing, flush=True)
    budget = replace(
        BUDGETS["gpu"],
        epochs=epochs,
        batch_size=args.batch_size,
        batches_per_epoch=args.limit_batches,
        seeds=tuple(seeds),
        device=args.device,
        sizing=sizing,
    )
    config = ReproduceConfig(data=args.pack, out=str(out), experiments=args.experiments, budget=budget)
    try:
        result = run_reproduce(config, progress=False, log=print)
        deadline.cancel()
    except KeyboardInterrupt:  # the deadline fell between two runs: report what finished
        deadline.cancel()
        result = run_reproduce(config, progress=False, log=None, report_only=True)
        result.interrupted = True
    timings["train_s"] = elapsed() - timings["startup_s"] - timings["probe_s"]
    summary = summarize(args, out, measured, epochs, epoch_s, result, timings, seeds)
    print(json.dumps({k: summary[k] for k in ("epochs", "affordable", "interrupted", "claims", "timings")}, indent=1))
    return 0


def describe_device(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"the CPU ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def summarize(
    args: argparse.Namespace,
    out: Path,
    measured: dict[str, dict[str, float]],
    epochs: int,
    epoch_s: float,
    result: Any,
    timings: dict[str, float],
    seeds: list[int],
) -> dict[str, Any]:
    """Write ``OUT/gpu_run.json`` and ``OUT/metrics_all.jsonl``, drop the checkpoints; returns the summary."""
    rows = collect_metrics(out, seeds)
    if not args.keep_checkpoints:
        remove_checkpoints(out)
    timings["total_s"] = elapsed()
    summary = {
        "device": describe_device(args.device),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "epochs": epochs,
        "affordable": f"{epochs} epochs (target {args.target_epochs})",
        "set_epoch_seconds": round(epoch_s, 2),
        "probe": measured,
        "models": [spec.key for spec in plan_runs(select_experiments(args.experiments))],
        "interrupted": result.interrupted,
        "pending": result.pending,
        "metric_rows": rows,
        "claims": {c["experiment"]: c["verdict"] for c in result.results.get("claims", [])},
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "gpu_run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_main(argv: list[str] | None = None) -> int:
    """:func:`main` with a user's mistake (a damaged pack, an unwritable --out, an unknown experiment) as one line
    and exit code 2."""
    try:
        return main(argv)
    except MobileNetError as error:
        print(f"gpu_reproduce: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(run_main())
