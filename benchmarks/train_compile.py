"""Does torch.compile speed up CPU training? One training step, eager against ``torch.compile``, side by side.

The step is the CIFAR-10 CPU recipe's (benchmarks/train_cifar10.py): the model with ``small_input`` at 32 px,
channels_last, SGD with Nesterov momentum (multi-tensor update), label-smoothed cross-entropy, the allocator tuned
as ``mobilenet train`` tunes it; random data, so loading is not measured. Order: eager, compiled, eager again (the
second eager run shows how much the machine drifted meanwhile). The compiled model's first step includes compiling.

    python benchmarks/train_compile.py --model mobilenet_v1_0.5_224 --batch-size 128 --steps 8 --threads 2
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v1_0.5_224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 1 + 2 untimed)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from mobilenet.models import create_model
    from mobilenet.runtime import tune_allocator

    tune_allocator()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def measure(label: str, compile_model: bool) -> float:
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=10, resolution=args.resolution, small_input=True)
        model = model.to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
        run = torch.compile(model) if compile_model else model

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(run(x), y).backward()
            optimizer.step()

        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        for _ in range(2):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = (time.perf_counter() - start) / args.steps
        print(
            f"{label:12s} first step {first:6.1f} s   {seconds * 1000:6.0f} ms/step   "
            f"{args.batch_size / seconds:6.0f} images/s",
            flush=True,
        )
        return seconds

    eager = measure("eager", False)
    compiled = measure("compile", True)
    eager_again = measure("eager again", False)
    print(f"compiled / eager step time: {compiled / ((eager + eager_again) / 2):.2f}")


if __name__ == "__main__":
    main()
