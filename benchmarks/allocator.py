"""The allocator lead of issue 5, side by side: glibc's defaults vs :func:`mobilenet.runtime.tune_allocator`.

Each measurement runs in a fresh subprocess (the allocator setting is per process and cannot be undone), with the
same model, input and threads; the two settings alternate (default, tuned, default, tuned, ...) so that other load
on the machine hits both alike. Per workload it prints the minor page faults per iteration (``ru_minflt``: a
count, not noisy) and the median seconds per iteration.

Workloads: ``eager`` (PyTorch forward as built), ``jit`` (BatchNorm folded, traced, frozen, optimized), ``train``
(forward + backward + SGD step). MobileNetV2 1.0 by default.

    python benchmarks/allocator.py --workloads eager,jit,train --batch-size 32 --resolution 224 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, statistics, sys, time
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from mobilenet.runtime import minor_faults, tune_allocator
state = tune_allocator()
from mobilenet.models import create_model
model = create_model(args["model"], resolution=args["resolution"])
x = torch.randn(args["batch"], 3, args["resolution"], args["resolution"])
if args["workload"] == "train":
    model.train()
    y = torch.randint(0, 1000, (args["batch"],))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    def step():
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
else:
    model.eval()
    if args["workload"] == "jit":
        from mobilenet.backends import jit_optimize
        model = jit_optimize(model, tuple(x.shape))
    def step():
        with torch.inference_mode():
            model(x)
for _ in range(args["warmup"]):
    step()
times, faults = [], []
for _ in range(args["steps"]):
    f, t = minor_faults(), time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
    faults.append(minor_faults() - f)
print(json.dumps({"applied": state.applied, "reason": state.reason, "times": times, "faults": faults}))
"""


def run_worker(settings: dict, tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    if tuned:
        env.pop("MOBILENET_NO_MALLOC_TUNING", None)
    else:
        env["MOBILENET_NO_MALLOC_TUNING"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(settings)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--workloads", default="eager,jit,train")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed iterations per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting (alternating)")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()

    report = []
    print(
        f"{args.model}, batch {args.batch_size}, {args.resolution}px, {args.threads} threads; {args.repeats} "
        f"processes per setting x {args.steps} timed iterations (after {args.warmup} warm-up)"
    )
    print(f"{'workload':8} {'allocator':22} {'faults/iter':>12} {'median s/iter':>14} {'speedup':>8}")
    for workload in args.workloads.split(","):
        settings = {
            "model": args.model,
            "workload": workload,
            "batch": args.batch_size,
            "resolution": args.resolution,
            "threads": args.threads,
            "steps": args.steps,
            "warmup": args.warmup,
        }
        collected: dict[bool, dict[str, list]] = {False: {"times": [], "faults": []}, True: {"times": [], "faults": []}}
        for _ in range(args.repeats):
            for tuned in (False, True):
                result = run_worker(settings, tuned)
                assert result["applied"] == tuned, result["reason"]
                collected[tuned]["times"] += result["times"]
                collected[tuned]["faults"] += result["faults"]
        medians = {tuned: statistics.median(collected[tuned]["times"]) for tuned in (False, True)}
        for tuned in (False, True):
            faults = statistics.median(collected[tuned]["faults"])
            label = "tuned (mallopt)" if tuned else "glibc defaults"
            speedup = medians[False] / medians[tuned]
            print(f"{workload:8} {label:22} {faults:12.0f} {medians[tuned]:14.4f} {speedup:7.2f}x")
        report.append({"workload": workload, **settings, "default": collected[False], "tuned": collected[True]})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
