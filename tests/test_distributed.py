"""Distributed training pieces: the process context, the samplers' split of the data, and a DDP step that equals a
single process's step on the global batch."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from mobilenet.distributed import DistContext, EpochSampler, ShardSampler, all_reduce_sum
from mobilenet.models import create_model
from mobilenet.optim import resolve_recipe
from mobilenet.train import TrainConfig

TINY = "mobilenet_v1_0.25_128"


def test_context_from_torchrun_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert DistContext.from_env() == DistContext(0, 1, 0) and not DistContext.from_env().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    context = DistContext.from_env()
    assert (context.rank, context.world_size, context.local_rank) == (3, 4, 1)
    assert context.enabled and not context.is_main


def test_all_reduce_sum_is_the_identity_in_one_process():
    values = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(values, DistContext()) is values
    assert values.tolist() == [1.0, 2.0]


def _order(seed: int, epoch: int, *, rank: int = 0, world: int = 1, skip: int = 0) -> list[int]:
    sampler = EpochSampler(list(range(50)), DistContext(rank, world, rank), seed=seed, batch_size=4)
    sampler.set_epoch(epoch, skip_batches=skip)
    order = list(sampler)
    assert len(order) == len(sampler)
    return order


def test_epoch_order_is_a_function_of_seed_and_epoch():
    first = _order(seed=3, epoch=1)
    assert _order(seed=3, epoch=1) == first  # a fresh sampler (a resumed run) sees the same order
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert _order(seed=3, epoch=2) != first
    assert _order(seed=4, epoch=1) != first
    # Resuming at batch 2 continues the same order without the 2 x 4 images already seen.
    assert _order(seed=3, epoch=1, skip=2) == first[8:]


def test_epoch_order_splits_between_ranks_without_overlap():
    ranks = [_order(seed=0, epoch=5, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 25
    assert not set(ranks[0]) & set(ranks[1])


def test_shard_sampler_visits_every_index_once_across_ranks():
    shards = [list(ShardSampler(10, DistContext(r, 3, r))) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for shard in shards for i in shard) == list(range(10))


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from mobilenet.distributed import wrap_distributed
    from mobilenet.optim import build_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model(TINY, resolution=32, small_input=True, num_classes=3, dropout=0.0)
    # BatchNorm in eval mode: with per-process batch statistics (gloo cannot run SyncBatchNorm) the two halves
    # would be normalised differently from the global batch; running statistics make the step comparable exactly.
    model.eval()
    recipe = resolve_recipe(TrainConfig(model=TINY, data="x", out="y", batch_size=8), small_images=True)
    optimizer = build_optimizer(model, recipe)
    ddp = wrap_distributed(model, torch.device("cpu"), sync_bn=True)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3
    half = slice(rank * 4, rank * 4 + 4)
    loss = torch.nn.functional.cross_entropy(ddp(x[half]), y[half], label_smoothing=recipe.label_smoothing)
    loss.backward()
    optimizer.step()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    dist.destroy_process_group()


def test_ddp_averaged_step_equals_single_process_step(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from mobilenet.optim import build_optimizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.safetensors"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = create_model(TINY, resolution=32, small_input=True, num_classes=3, dropout=0.0)
    model.eval()
    recipe = resolve_recipe(TrainConfig(model=TINY, data="x", out="y", batch_size=8), small_images=True)
    optimizer = build_optimizer(model, recipe)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 3
    torch.nn.functional.cross_entropy(model(x), y, label_smoothing=recipe.label_smoothing).backward()
    optimizer.step()
    distributed = load_file(str(out))
    changed = 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-5, atol=1e-6, msg=key)
        changed += int(
            not torch.equal(value, create_model(TINY, resolution=32, small_input=True, num_classes=3).state_dict()[key])
        )
    assert changed > 0
