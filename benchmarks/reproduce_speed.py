"""How long ``mobilenet reproduce`` takes: each model's measured training and evaluation speed, and the budget.

For every model of the reproduction (V1 Tables 4-7, V2 vs V1, at its CIFAR input size with ``small_input``), times
training steps (forward, label-smoothed loss, backward, the recipe's SGD step: what :func:`mobilenet.train.train`
does per batch, on random data so loading is not measured) and evaluation forward passes, then prints images/s
per model and the time a budget of ``--epochs`` x ``--batches`` batches (plus one evaluation of ``--eval-images``
test images per epoch) would take for the whole set. This is how the ``quick`` budget was sized
(docs/reproduce.md).

    python benchmarks/reproduce_speed.py --threads 2 --epochs 3 --batches 80
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="budget to price: epochs")
    parser.add_argument("--batches", type=int, default=80, help="budget to price: batches per epoch")
    parser.add_argument("--eval-images", type=int, default=10_000, help="test images evaluated after each epoch")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()

    import torch
    from torch import nn

    from mobilenet.models import create_model
    from mobilenet.optim import build_optimizer, resolve_recipe
    from mobilenet.reproduce_experiments import plan_runs, select_experiments
    from mobilenet.runtime import tune_allocator
    from mobilenet.train import TrainConfig

    # As mobilenet train on a CPU: the allocator tuned, the model and inputs channels_last.
    tune_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for spec in plan_runs(select_experiments(None)):
        model = create_model(spec.model, **spec.options()).to(memory_format=torch.channels_last)
        config = TrainConfig(model=spec.model, data="-", out="-", batch_size=args.batch_size, epochs=args.epochs)
        optimizer = build_optimizer(model, resolve_recipe(config, small_images=True))
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        x = torch.randn(args.batch_size, 3, spec.resolution, spec.resolution).contiguous(
            memory_format=torch.channels_last
        )
        y = torch.randint(0, 10, (args.batch_size,))
        times = []
        model.train()
        for step in range(args.steps + 1):
            start = time.perf_counter()
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step:
                times.append(time.perf_counter() - start)
        model.eval()
        with torch.inference_mode():
            model(x)
            start = time.perf_counter()
            model(x)
            eval_seconds = time.perf_counter() - start
        train_ips = args.batch_size / statistics.median(times)
        eval_ips = args.batch_size / eval_seconds
        seconds = args.epochs * (args.batches * args.batch_size / train_ips + args.eval_images / eval_ips)
        rows.append(
            {
                "key": spec.key,
                "train_images_per_s": train_ips,
                "eval_images_per_s": eval_ips,
                "budget_seconds": seconds,
            }
        )
        print(
            f"{spec.key:24s} train {train_ips:7.1f} img/s  eval {eval_ips:7.1f} img/s  budget {seconds / 60:6.1f} min",
            flush=True,
        )
    total = sum(row["budget_seconds"] for row in rows)
    print(
        f"whole set: {total / 60:.1f} min for {args.epochs} epochs x {args.batches} batches of {args.batch_size} "
        f"+ {args.eval_images} test images per epoch, {args.threads} threads"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows, "total_seconds": total}, handle, indent=2)


if __name__ == "__main__":
    main()
