"""Training throughput: this library's training step vs torchvision's ``mobilenet_v2`` in a plain loop.

Both train MobileNet V2 1.0 (the same architecture: torchvision's is the reference implementation of Table 2) at
the same batch size and resolution, on the same random data (so data loading is not measured), with SGD +
momentum and cross-entropy.

- ``torchvision``: what a user writes: ``torchvision.models.mobilenet_v2()``, ``torch.optim.SGD``, a plain eager
  loop, glibc's default allocator. It runs in its own process, which never imports this library.
- ``mobilenet``: the step ``mobilenet train`` runs, with its settings (:func:`mobilenet.train.speed_settings`): the
  allocator tuned (:func:`mobilenet.runtime.tune_allocator`), ``create_model``, ``build_optimizer`` (parameter
  groups without decay on BN/bias/depthwise, Nesterov, the multi-tensor update), label-smoothed loss, and the
  memory layout ``mobilenet train`` picks for the device.
- ``torchvision+tuned`` (with ``--tuned-baseline``): torchvision's loop in a process with the allocator tuned, to
  show how much of the difference is the allocator alone.

Each runs in a separate worker process (the allocator setting is per process); rounds alternate between the
workers (ours, theirs, ours, ...) so that other load on the machine hits both alike. The median images/s of each
is reported with the ratio.

    python benchmarks/train_speed.py --batch-size 32 --resolution 224 --steps 3 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import torch
args = json.loads(sys.argv[1])
kind = args["kind"]
if args["threads"]:
    torch.set_num_threads(args["threads"])
torch.manual_seed(0)
x = torch.randn(args["batch_size"], 3, args["resolution"], args["resolution"])
y = torch.randint(0, 1000, (args["batch_size"],))
if kind == "mobilenet":
    from mobilenet.models import create_model
    from mobilenet.optim import build_optimizer, resolve_recipe
    from mobilenet.train import TrainConfig, speed_settings

    config = TrainConfig(model="mobilenet_v2_1.0_224", data="-", out="-", batch_size=args["batch_size"])
    if args["channels_last"] != "auto":
        config.channels_last = args["channels_last"] == "on"
    settings = speed_settings(config, torch.device("cpu"))
    model = create_model("mobilenet_v2_1.0_224", resolution=args["resolution"])
    recipe = resolve_recipe(config, small_images=False)
    optimizer = build_optimizer(model, recipe)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    channels_last = settings["channels_last"]
    note = json.dumps(settings)
else:
    import torchvision

    if kind == "torchvision+tuned":
        from mobilenet.runtime import tune_allocator

        tune_allocator()
    model = torchvision.models.mobilenet_v2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    criterion = torch.nn.CrossEntropyLoss()
    channels_last = False
    note = "plain loop" + (", allocator tuned" if kind == "torchvision+tuned" else "")
if channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
model.train()


def step():
    bf16 = args["amp"] == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = criterion(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


for _ in range(args["warmup"]):
    step()
print(json.dumps({"ready": note}), flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    for _ in range(args["steps"]):
        step()
    print(json.dumps({"rate": args["steps"] * args["batch_size"] / (time.perf_counter() - start)}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per worker first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in every worker")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast for all")
    parser.add_argument(
        "--channels-last",
        default="auto",
        help="our memory layout: auto (what mobilenet train picks), on or off; a comma-separated list runs one worker "
        "per value, side by side (torchvision's loop stays NCHW)",
    )
    parser.add_argument("--tuned-baseline", action="store_true", help="also torchvision with the allocator tuned")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    layouts = [value.strip() for value in args.channels_last.split(",")]
    if any(value not in ("auto", "on", "off") for value in layouts):
        parser.error(f"--channels-last takes auto, on, off or a list of them, got {args.channels_last!r}")
    ours = ["mobilenet"] if layouts == ["auto"] else [f"mobilenet[channels_last={value}]" for value in layouts]
    kinds = [*ours, "torchvision"] + (["torchvision+tuned"] if args.tuned_baseline else [])
    workers: dict[str, subprocess.Popen] = {}
    notes: dict[str, str] = {}
    for kind in kinds:
        layout = kind.partition("=")[2].rstrip("]") or "auto"
        env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
        env.pop("MOBILENET_NO_MALLOC_TUNING", None)
        settings = {
            "kind": "mobilenet" if kind.startswith("mobilenet") else kind,
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "amp": args.amp,
            "channels_last": layout,
        }
        workers[kind] = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(settings)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
    # Warm-ups run one worker at a time, so none is timed against another's start-up.
    for kind, worker in workers.items():
        notes[kind] = json.loads(worker.stdout.readline())["ready"]
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_index in range(args.rounds):
        order = kinds[round_index % len(kinds) :] + kinds[: round_index % len(kinds)]
        for kind in order:
            worker = workers[kind]
            worker.stdin.write("go\n")
            worker.stdin.flush()
            rates[kind].append(json.loads(worker.stdout.readline())["rate"])
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    medians = {kind: statistics.median(values) for kind, values in rates.items()}
    print(
        f"MobileNetV2 1.0, batch {args.batch_size}, {args.resolution}px, {args.threads} threads, amp={args.amp}; "
        f"{args.rounds} interleaved rounds x {args.steps} steps (after {args.warmup} warm-up steps); load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    labels = {
        "mobilenet": "mobilenet (mobilenet train's step)",
        "torchvision": "torchvision mobilenet_v2, plain loop",
        "torchvision+tuned": "torchvision, plain loop + tuned allocator",
    }
    for kind in kinds:
        shown = ", ".join(f"{v:.1f}" for v in rates[kind])
        print(f"{labels.get(kind, kind):42}: {medians[kind]:7.1f} images/s  (rounds {shown})  [{notes[kind]}]")
    for kind in ours:
        paired = statistics.median(a / b for a, b in zip(rates[kind], rates["torchvision"], strict=True))
        print(
            f"ratio {kind} / torchvision plain loop: {medians[kind] / medians['torchvision']:.2f} (of the medians), "
            f"{paired:.2f} (median of the rounds' ratios: each round runs both, so drift in the load cancels)"
        )
        if args.tuned_baseline:
            ratio = medians[kind] / medians["torchvision+tuned"]
            print(f"ratio {kind} / torchvision with the same allocator tuning: {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "rates": rates, "medians": medians, "notes": notes}, handle, indent=2)


if __name__ == "__main__":
    main()
