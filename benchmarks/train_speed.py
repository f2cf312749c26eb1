"""Training throughput: this library's training step vs torchvision's ``mobilenet_v2`` in a plain loop.

Both train MobileNet V2 1.0 (the same architecture: torchvision's is the reference implementation of Table 2) at
the same batch size and resolution, on random data (so data loading is not measured), with SGD + momentum and
cross-entropy. Ours goes through the library's own pieces: ``create_model``, ``build_optimizer`` (parameter groups
without decay on BN/bias/depthwise, Nesterov), label-smoothed loss, optional channels_last and autocast as
``mobilenet train`` sets them. Rounds are interleaved (ours, theirs, ours, ...) so that other load on the machine
hits both alike; the median images/s of each is reported with the ratio.

    python benchmarks/train_speed.py --batch-size 32 --resolution 96 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--channels-last", action="store_true", help="NHWC for both")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off", help="autocast for both")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()

    import torch
    import torchvision

    from mobilenet.models import create_model
    from mobilenet.train import TrainConfig, build_optimizer, resolve_device, resolve_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    ours = create_model("mobilenet_v2_1.0_224", resolution=args.resolution).to(device)
    recipe = resolve_recipe(
        TrainConfig(model="mobilenet_v2_1.0_224", data="-", out="-", batch_size=args.batch_size), small_images=False
    )
    ours_opt = build_optimizer(ours, recipe)
    theirs = torchvision.models.mobilenet_v2().to(device)
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
        theirs.to(memory_format=torch.channels_last)
    ours_loss = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    plain_loss = torch.nn.CrossEntropyLoss()

    def step(model, optimizer, criterion) -> None:
        context = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if args.amp == "bf16"
            else torch.autocast(device.type, enabled=False)
        )
        with context:
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(model, optimizer, criterion) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(model, optimizer, criterion)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * args.batch_size / (time.perf_counter() - start)

    ours.train()
    theirs.train()
    for _ in range(2):  # warm-up
        step(ours, ours_opt, ours_loss)
        step(theirs, theirs_opt, plain_loss)
    rates: dict[str, list[float]] = {"mobilenet": [], "torchvision": []}
    for _ in range(args.rounds):
        rates["mobilenet"].append(timed(ours, ours_opt, ours_loss))
        rates["torchvision"].append(timed(theirs, theirs_opt, plain_loss))
    ours_rate = statistics.median(rates["mobilenet"])
    theirs_rate = statistics.median(rates["torchvision"])
    print(
        f"device {device}, threads {torch.get_num_threads()}, batch {args.batch_size}, {args.resolution}px, "
        f"channels_last={args.channels_last}, amp={args.amp}"
    )
    print(f"mobilenet (create_model + build_optimizer) : {ours_rate:8.1f} images/s  rounds {rates['mobilenet']}")
    print(f"torchvision mobilenet_v2, plain SGD loop   : {theirs_rate:8.1f} images/s  rounds {rates['torchvision']}")
    print(f"ratio ours / torchvision: {ours_rate / theirs_rate:.2f}")


if __name__ == "__main__":
    main()
