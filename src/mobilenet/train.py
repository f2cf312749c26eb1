"""Training: the loop, and run directories that resume exactly.

``train(TrainConfig(model="mobilenet_v2_1.0_224", data="cifar10", out="runs/c10"))`` is what ``mobilenet train``
calls. The recipes (the papers' and a modern one), optimizers, schedules and EMA are in :mod:`mobilenet.optim`;
the processes of a ``torchrun`` job and their samplers are in :mod:`mobilenet.distributed`.

The run directory holds ``last.safetensors`` and ``best.safetensors`` (weights + model config, classes and
preprocessing, readable by :func:`mobilenet.checkpoint.load`), ``train_state.safetensors`` (everything needed to
resume: weights, EMA, optimizer tensors, RNG states, with the structure and numbers as JSON in its header),
``config.json``, ``metrics.jsonl``/``metrics.csv`` and ``curves.png``. Every file is written atomically, the weights
files before the state that records them, so a kill at any point leaves a state whose checkpoints exist (a resume
repairs one that does not). A resumed run ends with the same weights as an uninterrupted one: each epoch's
shuffling is seeded from (seed, epoch, rank), the augmentation from (seed, epoch, image) or (seed, epoch, rank,
batch) whichever process runs it, and an interruption mid-epoch stores the RNG state and the batch position.

:func:`train` reads as the run goes: prepare (device, data, model, optimizer), resume, write ``config.json``, then
per epoch train, validate and save, and finally plot the curves.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import Progress
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mobilenet.checkpoint import STATE_FILE, check_shapes, load_checkpoint, read_header, read_state, write_state
from mobilenet.checkpoint import save as save_weights
from mobilenet.convert import pretrained
from mobilenet.data import (
    BUILTIN_DATA,
    BatchSmallAugment,
    DataBundle,
    DeviceBatches,
    Preprocessing,
    SeededDataset,
    TensorImageDataset,
    derive_seed,
    iterate_loader,
    load_data,
    normalize_batch,
)
from mobilenet.distributed import (
    DistContext,
    EpochSampler,
    ShardSampler,
    all_reduce_sum,
    setup_distributed,
    wrap_distributed,
)
from mobilenet.errors import MobileNetError
from mobilenet.evaluate import accumulate, summarize
from mobilenet.io import (
    atomic_write_text,
    check_output_dir,
    check_output_file,
    check_outside_directory,
    directory_lock,
    finite_json_number,
    json_safe,
    remove_stale_temporaries,
)
from mobilenet.models import MobileNet, create_model
from mobilenet.optim import ModelEMA, Recipe, build_optimizer, lr_at, resolve_recipe
from mobilenet.plots import plot_training_curves
from mobilenet.progress import new_progress
from mobilenet.runtime import resolve_device, tune_allocator
from mobilenet.spec import model_config
from mobilenet.train_config import TrainConfig

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "initialise_from",
    "speed_settings",
    "train",
]


class TrainingDiverged(MobileNetError):
    """The training or validation loss became NaN or infinite; the last good checkpoint was kept."""


def speed_settings(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Apply and describe the speed settings :func:`train` uses (measured in benchmarks/train_speed.py, figures in
    docs/speed.md): on the CPU, glibc's allocator keeps activation pages instead of mapping and zeroing them again
    every step (:func:`mobilenet.runtime.tune_allocator`; ``MOBILENET_NO_MALLOC_TUNING=1`` opts out) and the memory
    layout is channels_last unless ``config.channels_last`` is False (elsewhere: only when True)."""
    allocator = tune_allocator() if device.type == "cpu" else None
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cpu"
    return {
        "allocator": allocator.to_dict() if allocator is not None else None,
        "channels_last": bool(channels_last),
    }


# --------------------------------------------------------------------------------------------------------------
# The loop: train() and its steps, in the order a run takes them
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    interrupted: bool
    best_top1: float
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None


def _fresh_partial() -> dict[str, Any]:
    """The running totals of an epoch that has not started."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


@dataclass
class _Progress:
    """Where a run stands: the counters the training state stores and a resume restores."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The current epoch's running totals (loss sum, correct, seen, seconds), kept across an interruption.
    partial: dict[str, Any] = field(default_factory=_fresh_partial)
    #: What ``last``/``best.safetensors`` hold: ``{"last": {"epoch": E, "sha256": digest}, "best": {...}}``.
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class _Run:
    """What every step of one run works with, assembled once by :func:`_prepare`."""

    config: TrainConfig
    dist_ctx: DistContext
    device: torch.device
    channels_last: bool
    say: Callable[[str], None]
    run_dir: Path
    bundle: DataBundle
    resolution: int
    small_input: bool
    preprocessing: Preprocessing
    recipe: Recipe
    train_set: Dataset
    batch_augment: BatchSmallAugment | None
    #: The training images on the device (``device_data``), in each epoch's order; None: a DataLoader.
    device_batches: DeviceBatches | None
    val_loader: DataLoader | DeviceBatches
    per_rank_batch: int
    steps_per_epoch: int
    model: MobileNet
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    #: What the training step calls: ``model``, or its DDP wrapper once :func:`train` has wrapped it.
    train_model: nn.Module

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def deployable(self) -> nn.Module:
        """The weights that are validated and saved: the EMA's when on, else the model's."""
        return self.ema.module if self.ema is not None else self.model


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    on_step: Callable[[int], None] | None = None,
    data: Any = None,
) -> TrainResult:
    """Train (or resume) a run described by ``config``; returns when done or after a SIGINT/SIGTERM checkpoint.

    ``data``: an already loaded :class:`mobilenet.data.DataBundle` to use instead of loading ``config.data`` (which
    is then only recorded): :mod:`mobilenet.reproduce` trains many models on one dataset and decodes it once.

    Raises :class:`TrainingDiverged` when the loss turns NaN/inf (the last good checkpoint stays in place) and
    :class:`MobileNetError` for any mistake in the inputs.
    """
    with ExitStack() as held:  # the run directory's lock, from its check to the end of the run
        run = _prepare(config, log=log, data=data, held=held)
        _remove_stale_temporaries(run)
        state = _resume(run) if config.resume else _Progress()
        if run.dist_ctx.enabled:  # after the resume: DDP broadcasts rank 0's (loaded) weights when it is built
            run.train_model = wrap_distributed(run.model, run.device, sync_bn=config.sync_bn)
        _write_config(run)
        run.say(_describe(run))
        interrupted = _run_epochs(run, state, progress=progress, on_step=on_step)
        return _finish(run, state, interrupted=interrupted)


def _prepare(config: TrainConfig, *, log: Callable[[str], None] | None, data: Any, held: ExitStack) -> _Run:
    """Set up this process (threads, device, process group), check and lock the run directory (the lock joins
    ``held``: one writer per run directory, rank 0 for a distributed run), load the data, build the model on the
    device with its optimizer, EMA, loss scaler and loss."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    dist_ctx = DistContext.from_env()
    device = resolve_device(config.device, dist_ctx.local_rank)
    channels_last = speed_settings(config, device)["channels_last"]
    setup_distributed(dist_ctx, device)
    say = log if dist_ctx.is_main and log is not None else _silent
    run_dir = Path(config.out)
    _check_run_dir(run_dir, resume=config.resume, data=None if data is not None else config.data)
    if dist_ctx.is_main:
        held.enter_context(directory_lock(run_dir, "--out"))

    torch.manual_seed(config.seed)
    bundle = (
        data
        if data is not None
        else load_data(
            config.data, val_fraction=config.val_fraction, seed=config.seed, on_bad_image=config.on_bad_image
        )
    )
    _check_split(bundle)
    for note in bundle.notes:
        say(f"note: {note}")
    model, resolution, small_input = _create_model(config, bundle, say)
    preprocessing = bundle.preprocessing(resolution)
    recipe = _fine_tuning(config, resolve_recipe(config, small_images=preprocessing.style == "small"), say)
    train_set, batch_augment = _train_set(config, bundle, preprocessing, resolution)
    per_rank_batch, steps_per_epoch = _batches(config, dist_ctx, len(train_set))
    device_batches, val_loader = _loaders(
        config, bundle, preprocessing, batch_augment, dist_ctx, per_rank_batch, device
    )

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe)
    ema = ModelEMA(model, config.ema_decay) if config.ema_decay > 0 else None
    amp_dtype, use_scaler = _amp_settings(config.amp, device)
    return _Run(
        config=config,
        dist_ctx=dist_ctx,
        device=device,
        channels_last=channels_last,
        say=say,
        run_dir=run_dir,
        bundle=bundle,
        resolution=resolution,
        small_input=small_input,
        preprocessing=preprocessing,
        recipe=recipe,
        train_set=train_set,
        batch_augment=batch_augment,
        device_batches=device_batches,
        val_loader=val_loader,
        per_rank_batch=per_rank_batch,
        steps_per_epoch=steps_per_epoch,
        model=model,
        optimizer=optimizer,
        ema=ema,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler(device.type, enabled=use_scaler),
        criterion=nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing),
        train_model=model,
    )


def _check_split(bundle: DataBundle) -> None:
    """Both sets must hold images before anything is built: an empty validation set was found only after the first
    epoch's training, an empty training set reported as a batch larger than it."""
    if len(bundle.train) == 0:
        raise MobileNetError(
            f"the training set of {bundle.name} is empty: the validation set ({bundle.val_name}) takes all its "
            f"{len(bundle.val)} images; use a smaller --val-fraction"
        )
    if len(bundle.val) == 0:
        raise MobileNetError(
            f"the validation set of {bundle.name} is empty: a class with a single image keeps it for training, and "
            "every class has one; expected classes of 2 images or more, or a val/ folder beside train/"
        )


def _silent(_message: str) -> None:
    """The log of processes other than rank 0 (and of ``log=None``)."""


def _check_run_dir(run_dir: Path, *, resume: bool, data: Any = None) -> None:
    """A new run needs a directory without a run in it, outside its data folder; a resume needs the directory of a
    run: with a training state, or without one when the run stopped before its first state was saved (it then
    starts from the beginning)."""
    check_output_dir(run_dir, "--out")
    if isinstance(data, str | os.PathLike) and str(data) not in BUILTIN_DATA:
        check_outside_directory(run_dir, "--out", data, "the --data folder")
    state_path = run_dir / STATE_FILE
    if state_path.exists() and not resume:
        raise MobileNetError(
            f"{run_dir} already holds a run ({STATE_FILE}); pass --resume to continue it or choose another --out"
        )
    if resume and not run_dir.is_dir():
        raise MobileNetError(f"--resume: no {STATE_FILE} in {run_dir}; start a run there first (without --resume)")
    for name in RUN_FILES:  # a directory there would stop the run at its first write, with a traceback
        if os.path.lexists(run_dir / name):
            check_output_file(run_dir / name, "the run's file")


#: The files a run directory holds, each rewritten atomically as the run goes.
RUN_FILES = (
    STATE_FILE,
    "last.safetensors",
    "best.safetensors",
    "config.json",
    "metrics.jsonl",
    "metrics.csv",
    "curves.png",
)


def _remove_stale_temporaries(run: _Run) -> None:
    """Remove the temporary files a killed run left in its directory (a write interrupted before its rename)."""
    if not run.dist_ctx.is_main:
        return
    removed = remove_stale_temporaries(run.run_dir)
    if removed:
        run.say(f"removed {len(removed)} temporary file(s) left by an interrupted write in {run.run_dir}")


#: Fine-tuning (``init``) starts at this fraction of the recipe's learning rate: the weights are already good, and
#: the full rate of training from scratch would wreck them in the first steps.
FINE_TUNE_LR_FACTOR = 0.1


def _fine_tuning(config: TrainConfig, recipe: Recipe, say: Callable[[str], None]) -> Recipe:
    """The recipe, with the fine-tuning learning rate when starting from other weights and no ``--lr`` is given."""
    if not config.init or config.lr is not None:
        return recipe
    tuned = replace(recipe, lr=recipe.lr * FINE_TUNE_LR_FACTOR)
    say(
        f"fine-tuning from {config.init}: learning rate {tuned.lr:g} ({FINE_TUNE_LR_FACTOR:g} of the recipe's; "
        "--lr sets it)"
    )
    return tuned


def _resolution(config: TrainConfig, bundle: DataBundle, say: Callable[[str], None]) -> int:
    if config.resolution is not None:
        return config.resolution
    if bundle.native_size is not None:
        say(f"resolution: {bundle.native_size} px, the data's image size (--resolution sets another)")
        return bundle.native_size
    return model_config(config.model).resolution


def _small_input(config: TrainConfig, resolution: int) -> bool:
    """``small_input`` as given, else on at <= 64 px; but never switched on silently under pretrained weights,
    whose early layers learnt the paper's strides."""
    if config.small_input is not None:
        return config.small_input
    if config.init and resolution <= 64:
        donor_small = _donor_small_input(config.init)
        if donor_small is None:
            raise MobileNetError(
                f"--init {config.init} at {resolution} px: the pretrained weights were trained with the paper's "
                "strides; pass --small-input to run the first layers at stride 1 anyway (more compute, features at "
                "other scales than in pretraining) or --no-small-input to keep the strides (a 32-px image then ends "
                "on a 1x1 map)"
            )
        return donor_small
    return resolution <= 64


def _donor_small_input(init: str) -> bool | None:
    """The ``small_input`` of an ``--init`` checkpoint of this library (None for published ImageNet weights)."""
    if init in ("torchvision", "timm"):
        return None
    header = read_header(init)
    small = header["config"].get("small_input") if isinstance(header.get("config"), dict) else None
    return bool(small) if small else None


def _create_model(config: TrainConfig, bundle: DataBundle, say: Callable[[str], None]) -> tuple[MobileNet, int, bool]:
    """The model at the data's input size and number of classes (``--init`` weights unless resuming), with its
    resolution and ``small_input``."""
    resolution = _resolution(config, bundle, say)
    small_input = _small_input(config, resolution)
    overrides: dict[str, Any] = {"num_classes": len(bundle.classes), "resolution": resolution}
    overrides["small_input"] = small_input
    if config.alpha is not None:
        overrides["alpha"] = config.alpha
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    model = create_model(config.model, **overrides)
    if config.init and not (config.resume and (Path(config.out) / STATE_FILE).exists()):
        for note in initialise_from(model, config.init):
            say(note)
    if config.freeze_backbone:
        model.features.requires_grad_(False)
        say("--freeze-backbone: only the classifier trains")
    return model, resolution, small_input


def _train_set(
    config: TrainConfig, bundle: DataBundle, preprocessing: Preprocessing, resolution: int
) -> tuple[Dataset, BatchSmallAugment | None]:
    """The training images and, when small images already have the input size, the augmentation applied to
    whole batches in this process (then the dataset yields the raw uint8 images)."""
    if config.batch_augment and preprocessing.style == "small" and bundle.native_size == resolution:
        return bundle.train, BatchSmallAugment(preprocessing, flip=_hflip(config, bundle))
    flip = _hflip(config, bundle)
    return bundle.train_dataset(preprocessing, scale=(config.crop_scale_min, 1.0), flip=flip), None


def _loaders(
    config: TrainConfig,
    bundle: DataBundle,
    preprocessing: Preprocessing,
    batch_augment: BatchSmallAugment | None,
    dist_ctx: DistContext,
    per_rank_batch: int,
    device: torch.device,
) -> tuple[DeviceBatches | None, DataLoader | DeviceBatches]:
    """The training images on the device when ``device_data`` applies (else None: a DataLoader per epoch), and the
    validation batches: on the device too when both sets are in memory at the input size, else a DataLoader."""
    side = (preprocessing.input_size, preprocessing.input_size)
    in_memory = isinstance(bundle.train, TensorImageDataset) and isinstance(bundle.val, TensorImageDataset)
    in_memory = in_memory and tuple(bundle.val.images.shape[-2:]) == side
    wanted = config.device_data if config.device_data is not None else device.type == "cuda"
    if not (wanted and in_memory and batch_augment is not None):
        val_set = bundle.val_dataset(preprocessing)
        return None, _val_loader(val_set, config, dist_ctx, per_rank_batch, device)
    train_batches = DeviceBatches(bundle.train, device, batch_size=per_rank_batch)
    val_batches = DeviceBatches(
        bundle.val,
        device,
        batch_size=per_rank_batch,
        drop_last=False,
        transform=lambda images: normalize_batch(images, preprocessing),
    )
    return train_batches, val_batches.with_order(list(ShardSampler(len(bundle.val), dist_ctx)))


def _hflip(config: TrainConfig, bundle: DataBundle) -> bool:
    """Horizontal flips as given; by default on, but off for the digits (a mirrored 2 is no digit)."""
    return config.hflip if config.hflip is not None else bundle.name != "digits"


def _batches(config: TrainConfig, dist_ctx: DistContext, train_size: int) -> tuple[int, int]:
    """(batch per process, steps per epoch): the global batch splits evenly between processes."""
    global_batch = config.batch_size
    if global_batch % dist_ctx.world_size:
        raise MobileNetError(
            f"--batch-size {global_batch} must be divisible by the number of processes ({dist_ctx.world_size})"
        )
    steps_per_epoch = train_size // global_batch
    if steps_per_epoch == 0:
        raise MobileNetError(
            f"--batch-size {global_batch} is larger than the training set ({train_size} images); use a smaller one"
        )
    if config.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, config.limit_train_batches)
    return global_batch // dist_ctx.world_size, steps_per_epoch


def _resume(run: _Run) -> _Progress:
    """Load the training state: weights, optimizer, EMA, loss scale, the counters and (mid-epoch) this process's
    RNG, so the run continues exactly where it stopped; then bring the checkpoints and metrics files in line
    with the state."""
    if not run.state_path.exists():
        run.say(
            f"--resume: {run.run_dir} has no {STATE_FILE}: the run stopped before its first epoch was saved; "
            "starting it from the beginning"
        )
        return _Progress()
    tree, info = read_state(run.state_path)
    _check_state(run.state_path, tree, info)
    stored = info["model"]
    if stored["name"] != run.config.model or stored["config"] != run.model.config.to_dict():
        raise MobileNetError(
            f"--resume: {run.state_path} is a run of {stored['name']} ({_short_config(stored['config'])}), not "
            f"{run.config.model} ({_short_config(run.model.config.to_dict())}); use the same --model and options "
            "or another --out"
        )
    _check_same_run(run, info)
    try:
        run.model.load_state_dict(tree["model"])
        run.optimizer.load_state_dict(tree["optimizer"])
        if run.ema is not None and tree.get("ema") is not None:
            run.ema.module.load_state_dict(tree["ema"])
            run.ema.updates = info.get("ema_updates", 0)
        if info.get("scaler"):
            run.scaler.load_state_dict(info["scaler"])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise _corrupt_state(run.state_path, f"its tensors do not fit this run: {str(error).splitlines()[0]}") from None
    state = _Progress(
        epoch=info["epoch"],
        step_in_epoch=info["step_in_epoch"],
        global_step=info["global_step"],
        best_top1=info["best_top1"],
        history=info["history"],
        partial=info["partial"],
        checkpoints=info.get("checkpoints") or _legacy_checkpoints(info),
    )
    rng = tree["rng"][run.dist_ctx.rank] if run.dist_ctx.rank < len(tree["rng"]) else None
    if rng is not None and state.step_in_epoch:
        _restore_rng(rng, run.device)
    _repair_checkpoints(run, state)
    if run.dist_ctx.is_main:  # the state's epochs exactly: a kill may have come between the state and these files
        _write_metrics(run.run_dir, state.history)
    best = f"best val top-1 so far {state.best_top1:.2%}" if state.history else "no epoch finished yet"
    run.say(f"resuming {run.run_dir} at epoch {state.epoch + 1}, batch {state.step_in_epoch} ({best})")
    if state.epoch >= run.config.epochs:
        run.say(f"the run already finished its {state.epoch} epochs; pass a larger --epochs to continue")
    return state


#: The options that make a run what it is. Resumed with another value of one of them, the run would not continue but
#: become another: a new seed or validation fraction moves images between the held-out and the training set, a new
#: batch size or recipe changes every later step. ``--epochs``, the device, threads and workers may change.
RUN_OPTIONS = (
    "seed",
    "batch_size",
    "val_fraction",
    "recipe",
    "optimizer",
    "lr",
    "schedule",
    "warmup_epochs",
    "weight_decay",
    "decay_depthwise",
    "label_smoothing",
    "momentum",
    "ema_decay",
    "grad_clip",
    "crop_scale_min",
    "hflip",
    "batch_augment",
    "freeze_backbone",
    "limit_train_batches",
)


def _check_same_run(run: _Run, info: dict[str, Any]) -> None:
    """Refuse a resume whose options or data are not the run's: it went on silently (another --seed put validation
    images into training; other data with as many classes was trained into checkpoints labelled with its names)."""
    stored, current = info.get("train_config"), run.config.to_dict()
    if not isinstance(stored, dict):
        raise _corrupt_state(run.state_path, "'train_config' must be a JSON object")
    differences = [
        f"{_option_name(key)} {_shown(stored[key])} (now {_shown(current[key])})"
        for key in RUN_OPTIONS
        if key in stored and stored[key] != current[key]
    ]
    classes = info.get("classes")
    if classes is not None and classes != run.bundle.classes:
        differences.append(_class_difference(classes, run.bundle.classes))
    if differences:
        raise MobileNetError(
            f"--resume: {run.run_dir} is a run with {'; '.join(differences)}; resume it with its own options and "
            "data (only --epochs, the device, threads and workers may change) or choose another --out"
        )


def _option_name(key: str) -> str:
    return "--[no-]batch-augment" if key == "batch_augment" else "--" + key.replace("_", "-")


def _shown(value: Any) -> str:
    return "(not given)" if value is None else repr(value)


def _class_difference(stored: list[str], current: list[str]) -> str:
    if len(stored) != len(current):
        return f"{len(stored)} classes (now {len(current)} in the --data)"
    index = next(i for i, (a, b) in enumerate(zip(stored, current, strict=True)) if a != b)
    return f"class {index} {stored[index]!r} (now {current[index]!r} in the --data)"


def _corrupt_state(path: Path, what: str) -> MobileNetError:
    return MobileNetError(
        f"{path} is a corrupt training state ({what}); it cannot be resumed (start the run again, or resume from a "
        "copy)"
    )


def _check_state(path: Path, tree: Any, info: Any) -> None:
    """The JSON of a training state, which its tensors' checksum does not cover, before any of it is used: every
    counter a count, one history row per finished epoch, the tensors a model and an optimizer."""

    count = _is_count
    if not isinstance(info, dict) or not isinstance(tree, dict):
        raise _corrupt_state(path, "its header is not a JSON object")
    model = info.get("model")
    if (
        not isinstance(model, dict)
        or not isinstance(model.get("name"), str)
        or not isinstance(model.get("config"), dict)
    ):
        raise _corrupt_state(path, "'model' must hold the model's name and config")
    for key in ("epoch", "step_in_epoch", "global_step"):
        if not count(info.get(key)):
            raise _corrupt_state(path, f"'{key}' must be an integer >= 0, got {info.get(key)!r}")
    _check_history(path, info)
    partial = info.get("partial")
    if not isinstance(partial, dict) or not all(_is_measure(partial.get(key)) for key in _fresh_partial()):
        raise _corrupt_state(path, f"'partial' must hold the finite numbers >= 0 {', '.join(_fresh_partial())}")
    if not count(info.get("ema_updates", 0)):
        raise _corrupt_state(path, f"'ema_updates' must be an integer >= 0, got {info.get('ema_updates')!r}")
    checkpoints = info.get("checkpoints")
    if checkpoints is not None and (
        not isinstance(checkpoints, dict)
        or not all(
            isinstance(entry, dict)
            and count(entry.get("epoch"))
            and entry["epoch"] <= info["epoch"]
            and (entry.get("sha256") is None or isinstance(entry["sha256"], str))
            for entry in checkpoints.values()
        )
    ):
        raise _corrupt_state(
            path, "'checkpoints' must map file names to records of an epoch (at most the state's) and a digest"
        )
    classes = info.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise _corrupt_state(path, "'classes' must be a list of class names")
    if not isinstance(tree.get("model"), dict) or not isinstance(tree.get("optimizer"), dict):
        raise _corrupt_state(path, "it holds no model or optimizer tensors")
    rng = tree.get("rng")
    if not isinstance(rng, list) or not all(_is_rng_state(entry) for entry in rng):
        raise _corrupt_state(path, "'rng' must be a list of each process's RNG states (uint8 tensors)")


def _is_rng_state(entry: Any) -> bool:
    """Whether ``entry`` is what :func:`_rng_states` saves for one process: the CPU generator's state (a uint8
    tensor of the size torch's is) and the GPU's (one too) or None."""

    def byte_tensor(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1

    return (
        isinstance(entry, dict)
        and byte_tensor(entry.get("cpu"))
        and entry["cpu"].numel() == torch.get_rng_state().numel()
        and (entry.get("cuda") is None or byte_tensor(entry["cuda"]))
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_measure(value: Any) -> bool:
    """A JSON number (not a bool) that is finite and >= 0: what every figure of an epoch's metrics row is."""
    number = finite_json_number(value)
    return number is not None and number >= 0


#: The fields of an epoch's metrics row that are fractions of the images (0 to 1).
_FRACTION_FIELDS = ("train_top1", "val_top1", "val_top5")


def _check_history(path: Path, info: dict[str, Any]) -> None:
    """The finished epochs' rows (rewritten into the metrics files, plotted, read by ``mobilenet reproduce``):
    row ``i`` is epoch ``i + 1`` with every field of :data:`METRIC_FIELDS` a finite number >= 0, the top-1 and
    top-5 fractions at most 1; one row per finished epoch; and ``best_top1`` the highest validation top-1 among
    them (-1 before the first), since it decides which later epoch is written to best.safetensors."""
    history = info.get("history")
    if not isinstance(history, list):
        raise _corrupt_state(path, "'history' must be a list of epoch rows")
    for index, row in enumerate(history):
        bad = (
            ["the row"]
            if not isinstance(row, dict)
            else [key for key in METRIC_FIELDS if not _is_measure(row.get(key))]
            + [key for key in _FRACTION_FIELDS if _is_measure(row.get(key)) and row[key] > 1]
            + (["epoch"] if _is_measure(row.get("epoch")) and row["epoch"] != index + 1 else [])
        )
        if bad:
            raise _corrupt_state(
                path,
                f"'history' row {index} (epoch {index + 1}) has a missing or wrong {', '.join(bad)}; expected "
                f"the fields {', '.join(METRIC_FIELDS)}, finite numbers >= 0, top-1 and top-5 at most 1",
            )
    if len(history) != info["epoch"]:
        raise _corrupt_state(path, f"'epoch' is {info['epoch']} but 'history' holds {len(history)} finished epochs")
    best = max((row["val_top1"] for row in history), default=-1.0)
    if info.get("best_top1") != best:
        raise _corrupt_state(
            path, f"'best_top1' is {info.get('best_top1')!r}, expected the best val_top1 of 'history' ({best!r})"
        )


def _legacy_checkpoints(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a state written before the checkpoints' digests were recorded implies: ``last`` holds the state's
    epoch, ``best`` the first epoch with the highest validation top-1 (no digest: only presence is checked)."""
    files = {"last": {"epoch": info["epoch"], "sha256": None}}
    history = info.get("history") or []
    if history:
        best_row = max(history, key=lambda row: row["val_top1"])  # max() keeps the first of equal rows
        files["best"] = {"epoch": best_row["epoch"], "sha256": None}
    return files


def _repair_checkpoints(run: _Run, state: _Progress) -> None:
    """Make ``last``/``best.safetensors`` what the training state records. The weights files are written before
    the state, so after a kill they are the state's or newer ones (of an epoch the resumed run trains again and
    rewrites). A file that is missing or holds other weights (deleted, or a kill between an older version's state
    and weights writes) is written again from the state's weights when those are its weights, else reported."""
    if not run.dist_ctx.is_main:
        return
    for name in ("last", "best"):
        recorded = state.checkpoints.get(name)
        path = run.run_dir / f"{name}.safetensors"
        problem = None if recorded is None else _checkpoint_problem(path, recorded.get("sha256"), state.epoch)
        if problem is None:
            continue
        state_is_best = state.step_in_epoch == 0 and state.checkpoints.get("best", {}).get("epoch") == state.epoch
        if name == "last" or state_is_best:
            digest = _write_checkpoint(run, state, name, is_best=state_is_best)
            state.checkpoints[name] = {"epoch": state.epoch, "sha256": digest}
            run.say(f"repaired {path}: it {problem}; wrote it again from the training state (epoch {state.epoch})")
        else:
            run.say(
                f"warning: {path} {problem}: it should hold the weights of epoch {recorded['epoch']}, which the "
                f"training state no longer has (it holds epoch {state.epoch}'s); {name}.safetensors is written "
                f"again when an epoch improves on the best val top-1 ({state.best_top1:.2%})"
            )


def _checkpoint_problem(path: Path, sha256: str | None, state_epoch: int) -> str | None:
    """Why ``path`` is not the checkpoint the state recorded with digest ``sha256``; None when it is, or when it
    is from an epoch after the state's (which the resumed run trains again and writes again)."""
    if not path.exists():
        return "is missing"
    try:
        header = read_header(path)
    except MobileNetError as error:
        return f"cannot be read ({error})"
    if sha256 is None or header.get("weights_sha256") == sha256:
        return None
    epoch = (header.get("metadata") or {}).get("epoch")
    if isinstance(epoch, int) and epoch > state_epoch:
        return None
    return "holds other weights than the training state recorded for it"


def _write_config(run: _Run) -> None:
    """``config.json``: the model, data, recipe and options of the run, for people and tools (rank 0 writes)."""
    if not run.dist_ctx.is_main:
        return
    bundle = run.bundle
    run.run_dir.mkdir(parents=True, exist_ok=True)
    described = {
        "model": run.config.model,
        "model_config": run.model.config.to_dict(),
        "classes": bundle.classes,
        "preprocessing": run.preprocessing.to_dict(),
        "train_config": run.config.to_dict(),
        "recipe": asdict(run.recipe),
        "data": {"name": bundle.name, "train": len(bundle.train), "val": len(bundle.val), "val_split": bundle.val_name},
        "device": str(run.device),
        "world_size": run.dist_ctx.world_size,
    }
    atomic_write_text(run.run_dir / "config.json", json.dumps(described, indent=2) + "\n")


def _describe(run: _Run) -> str:
    """The line that opens a run's log."""
    config, bundle, recipe = run.config, run.bundle, run.recipe
    return (
        f"training {config.model} ({run.resolution}px, small_input={run.small_input}, {len(bundle.classes)} classes) "
        f"on {bundle.name}: {len(bundle.train)} train / {len(bundle.val)} {bundle.val_name} images, {config.epochs} "
        f"epochs x {run.steps_per_epoch} steps, batch {config.batch_size}, {recipe.optimizer} lr {recipe.lr:g} "
        f"{recipe.schedule}, wd {recipe.weight_decay:g}, device {run.device}"
        + (f" x {run.dist_ctx.world_size} processes" if run.dist_ctx.enabled else "")
        + (", images held on the device" if run.device_batches is not None else "")
    )


def _run_epochs(run: _Run, state: _Progress, *, progress: bool, on_step: Callable[[int], None] | None) -> bool:
    """Train, validate and save epoch after epoch up to ``config.epochs``; True when SIGINT/SIGTERM stopped the
    run first (after saving the state)."""
    stop = _StopFlag()
    with _signal_handlers(stop), _progress(progress and run.dist_ctx.is_main) as bar:
        while state.epoch < run.config.epochs:
            if not _train_epoch(run, state, bar, stop, on_step):
                return True
            row = _validate(run, state)
            _stop_if_metrics_diverged(run, state, row, bar)
            _end_epoch(run, state, row)
            if stop.signal is not None and state.epoch < run.config.epochs:
                run.say(f"interrupted after epoch {state.epoch}; continue with the same command plus --resume")
                return True
    return False


def _train_epoch(
    run: _Run, state: _Progress, bar: Progress, stop: _StopFlag, on_step: Callable[[int], None] | None
) -> bool:
    """Train the rest of epoch ``state.epoch`` (all of it unless resuming mid-epoch); False when a stop signal
    ended it early, after saving the state at that batch."""
    if state.step_in_epoch == 0:
        torch.manual_seed(_epoch_seed(run.config.seed, state.epoch, run.dist_ctx.rank))
        state.partial = _fresh_partial()
    loader = _epoch_loader(run, state.epoch, skip_batches=state.step_in_epoch)
    task = bar.add_task(
        f"epoch {state.epoch + 1}/{run.config.epochs}",
        total=run.steps_per_epoch,
        completed=state.step_in_epoch,
        stats="",
    )
    run.train_model.train()
    if run.config.freeze_backbone:
        run.model.features.eval()  # the frozen body keeps its BatchNorm statistics too
    started = time.perf_counter()
    for images, labels in iterate_loader(loader):
        if state.step_in_epoch >= run.steps_per_epoch:
            break
        lr = _train_step(run, state, images, labels, bar)
        elapsed = state.partial["seconds"] + time.perf_counter() - started
        bar.update(task, completed=state.step_in_epoch, stats=_running_stats(state.partial, elapsed, run, lr))
        if on_step is not None:
            on_step(state.global_step)
        if _stop_requested(stop, run.dist_ctx) and state.step_in_epoch < run.steps_per_epoch:
            state.partial["seconds"] += time.perf_counter() - started
            _save(run, state, best=False)
            run.say(
                f"interrupted: saved the state at epoch {state.epoch + 1}, batch {state.step_in_epoch} in "
                f"{run.state_path}; continue with the same command plus --resume"
            )
            bar.remove_task(task)
            return False
    state.partial["seconds"] += time.perf_counter() - started
    bar.remove_task(task)
    return True


def _train_step(run: _Run, state: _Progress, images: torch.Tensor, labels: torch.Tensor, bar: Progress) -> float:
    """One optimizer step on a batch at the schedule's learning rate, which it returns; the batch's loss and hits
    go into the epoch's running totals."""
    lr = lr_at(state.global_step, recipe=run.recipe, steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.batch_augment is not None:
        images = run.batch_augment(images, generator=_batch_generator(run, state))
    images = images.to(run.device, non_blocking=True)
    labels = labels.to(run.device, non_blocking=True)
    if run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(run.device, run.amp_dtype):
        logits = run.train_model(images)
        loss = run.criterion(logits.float(), labels)
    _stop_if_diverged(run, state, loss, bar)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.config.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    _optimizer_step(run, state, bar)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.model)
    state.global_step += 1
    state.step_in_epoch += 1
    batch = labels.shape[0]
    state.partial["loss_sum"] += loss.item() * batch
    state.partial["correct"] += int((logits.argmax(1) == labels).sum())
    state.partial["seen"] += batch
    return lr


def _optimizer_step(run: _Run, state: _Progress, bar: Progress) -> None:
    """The optimizer's step; a factor it computes from the learning rate and weight decay that overflows float32
    (AdamW divides the rate by its bias correction, 0.1 at the first step) stops the run as a divergence would."""
    try:
        run.scaler.step(run.optimizer)
    except RuntimeError as error:
        if "without overflow" not in str(error):
            raise
        bar.stop()
        raise _diverged(
            run,
            state,
            f"the optimizer step at epoch {state.epoch + 1}, batch {state.step_in_epoch + 1} overflowed float32 "
            f"(weight decay {run.recipe.weight_decay:g})",
        ) from None


def _stop_if_diverged(run: _Run, state: _Progress, loss: torch.Tensor, bar: Progress) -> None:
    """Raise :class:`TrainingDiverged` when the loss of any process is NaN/inf (all processes stop together)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if bool(all_reduce_sum(finite, run.dist_ctx).item() == run.dist_ctx.world_size):
        return
    bar.stop()
    raise _diverged(
        run, state, f"the loss became {loss.item()} at epoch {state.epoch + 1}, batch {state.step_in_epoch + 1}"
    )


def _stop_if_metrics_diverged(run: _Run, state: _Progress, row: dict[str, Any], bar: Progress) -> None:
    """Raise :class:`TrainingDiverged` before an epoch whose validation (or training) loss is NaN/inf is saved:
    weights that blew up can give finite training losses and still turn BatchNorm's statistics non-finite. The
    metrics are summed over all processes, so all stop together."""
    if math.isfinite(row["val_loss"]) and math.isfinite(row["train_loss"]):
        return
    bar.stop()
    raise _diverged(
        run,
        state,
        f"the validation loss became {row['val_loss']} after epoch {state.epoch + 1} (training loss "
        f"{row['train_loss']:.4g})",
    )


def _diverged(run: _Run, state: _Progress, what: str) -> TrainingDiverged:
    """The error for a run whose loss became non-finite: what happened, which checkpoint is kept, what to try."""
    last = run.run_dir / "last.safetensors"
    kept = (
        f"the last good checkpoint is kept at {last} (epoch {state.epoch})"
        if last.exists() and state.epoch > 0
        else "no checkpoint was written yet (no epoch finished)"
    )
    return TrainingDiverged(
        f"training stopped: {what}; {kept}; try a lower --lr (now {run.recipe.lr:g}) or --grad-clip 5"
    )


def _stop_requested(stop: _StopFlag, dist_ctx: DistContext) -> bool:
    """Whether any process got SIGINT/SIGTERM; every process asks after every batch, so all stop at the same one."""
    stop_now = torch.tensor([1.0 if stop.signal is not None else 0.0])
    return bool(all_reduce_sum(stop_now, dist_ctx).item() > 0)


def _validate(run: _Run, state: _Progress) -> dict[str, Any]:
    """The epoch's metrics row: validation of the deployable weights (the EMA's when on: those are the ones saved
    for deployment), and the training loss/accuracy over all processes' images, not rank 0's share only."""
    counts = accumulate(
        run.deployable,
        run.val_loader,
        num_classes=len(run.bundle.classes),
        device=run.device,
        amp_dtype=run.amp_dtype,
        channels_last=run.channels_last,
    )
    val = summarize(counts.all_reduce(run.dist_ctx), run.bundle.classes)
    partial = state.partial
    totals = all_reduce_sum(
        torch.tensor([partial["loss_sum"], float(partial["correct"]), float(partial["seen"])], dtype=torch.float64),
        run.dist_ctx,
    ).tolist()
    seen_total = totals[2]
    return {
        "epoch": state.epoch + 1,
        "train_loss": totals[0] / max(1.0, seen_total),
        "train_top1": totals[1] / max(1.0, seen_total),
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_s": seen_total / max(partial["seconds"], 1e-9),
        "epoch_seconds": partial["seconds"],
    }


def _end_epoch(run: _Run, state: _Progress, row: dict[str, Any]) -> None:
    """Record a finished epoch's ``row``, save the state and checkpoints, rewrite the metrics files, log it."""
    state.history.append(row)
    is_best = row["val_top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, row["val_top1"])
    state.epoch += 1
    state.step_in_epoch = 0
    _save(run, state, best=is_best)
    if run.dist_ctx.is_main:
        _write_metrics(run.run_dir, state.history)
    run.say(
        f"epoch {row['epoch']}/{run.config.epochs}: train loss {row['train_loss']:.3f} top-1 "
        f"{row['train_top1']:.2%} | {run.bundle.val_name} loss {row['val_loss']:.3f} top-1 {row['val_top1']:.2%} "
        + (f"top-5 {row['val_top5']:.2%} " if len(run.bundle.classes) > 5 else "")
        + f"| {row['images_per_s']:.0f} img/s, {row['epoch_seconds']:.0f} s"
        + (" (best)" if is_best else "")
    )


def _save(run: _Run, state: _Progress, *, best: bool) -> None:
    """Write the weights checkpoints, then the resumable state that records them (with every process's RNG):
    ``last`` always, ``best`` after an epoch that improved the validation top-1. The state comes last, so a kill
    at any point leaves a state whose files exist (or are newer, from the epoch a resume trains again). Rank 0
    writes the files."""
    rng = _rng_states(run)
    if not run.dist_ctx.is_main:
        return
    for name in ("last", "best") if best else ("last",):
        digest = _write_checkpoint(run, state, name, is_best=best)
        state.checkpoints[name] = {"epoch": state.epoch, "sha256": digest}
    write_state(run.state_path, _state_tensors(run, rng), _state_info(run, state))


def _rng_states(run: _Run) -> list[Any]:
    """Every process's RNG states (CPU, and CUDA on a GPU), indexed by rank: each resumes its own random stream."""
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
    }
    if not run.dist_ctx.enabled:
        return [rng]
    gathered: list[Any] = [None] * run.dist_ctx.world_size
    dist.all_gather_object(gathered, rng)
    return gathered


def _restore_rng(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _state_tensors(run: _Run, rng: list[Any]) -> dict[str, Any]:
    """The tensors of the training state: weights, optimizer, EMA and RNG states."""
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "ema": run.ema.module.state_dict() if run.ema is not None else None,
        "rng": rng,
    }


def _state_info(run: _Run, state: _Progress) -> dict[str, Any]:
    """The JSON part of the training state: what was trained how, and where the run stands."""
    return {
        "model": {"name": run.config.model, "config": run.model.config.to_dict()},
        "train_config": run.config.to_dict(),
        "classes": run.bundle.classes,
        "recipe": asdict(run.recipe),
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "best_top1": state.best_top1,
        "history": state.history,
        "partial": state.partial,
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "ema_updates": run.ema.updates if run.ema is not None else 0,
        "world_size": run.dist_ctx.world_size,
        "checkpoints": state.checkpoints,
    }


def _write_checkpoint(run: _Run, state: _Progress, name: str, *, is_best: bool) -> str:
    """The deployable weights as ``<name>.safetensors``, with the classes, preprocessing and what they are (epoch,
    validation metrics of a finished epoch) in the metadata; returns the digest of the weights written."""
    row = state.history[-1] if state.step_in_epoch == 0 and state.history else None
    val = (
        None
        if row is None
        else {"top1": row["val_top1"], "top5": row["val_top5"], "loss": row["val_loss"], "is_best": is_best}
    )
    metadata = {
        "epoch": state.epoch,
        "weights": "ema" if run.ema is not None else "raw",
        "val": val,
        "train_config": run.config.to_dict(),
    }
    path = save_weights(
        run.deployable,
        run.run_dir / f"{name}.safetensors",
        classes=run.bundle.classes,
        preprocessing=run.preprocessing,
        metadata=json_safe(metadata),
    )
    return read_header(path)["weights_sha256"]


METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "images_per_s",
    "epoch_seconds",
)


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl and metrics.csv from the run's history (kept in the training state, so a resumed run's
    files never hold a duplicated or missing epoch); one row per epoch, written atomically."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(json_safe(row)) + "\n" for row in history))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def _finish(run: _Run, state: _Progress, *, interrupted: bool) -> TrainResult:
    """Plot the training curves, log the summary of a completed run, and describe the outcome."""
    if run.dist_ctx.is_main and state.history:
        plot_training_curves(
            state.history, run.run_dir / "curves.png", title=f"{run.config.model} on {run.bundle.name}"
        )
    if not interrupted and run.dist_ctx.is_main and state.history:
        run.say(
            f"done: best {run.bundle.val_name} top-1 {state.best_top1:.2%}; checkpoints in {run.run_dir} "
            f"(best.safetensors, last.safetensors), curves in {run.run_dir / 'curves.png'}"
        )
    last, best = run.run_dir / "last.safetensors", run.run_dir / "best.safetensors"
    return TrainResult(
        run_dir=run.run_dir,
        epochs_done=state.epoch,
        interrupted=interrupted,
        best_top1=state.best_top1,
        history=state.history,
        last_checkpoint=last if last.exists() else None,
        best_checkpoint=best if best.exists() else None,
    )


# --------------------------------------------------------------------------------------------------------------
# Data loaders: the one place each epoch's batch order is decided
# --------------------------------------------------------------------------------------------------------------


def _epoch_loader(run: _Run, epoch: int, *, skip_batches: int) -> DataLoader | DeviceBatches:
    """This process's training batches of ``epoch``, from batch ``skip_batches`` on: the order is a function of
    (seed, epoch, rank, number of processes) only, so a resumed epoch sees the batches the uninterrupted one would
    have, whether they come from a DataLoader or from the images held on the device."""
    sampler = EpochSampler(run.train_set, run.dist_ctx, run.config.seed, run.per_rank_batch)
    sampler.set_epoch(epoch, skip_batches=skip_batches)
    if run.device_batches is not None:
        return run.device_batches.with_order(list(sampler))
    # Per-image random transforms run in the workers: seeded per image, they do not depend on which worker
    # produces which batch (which differs in a resumed epoch). The per-batch augmentation is seeded per batch.
    dataset = (
        run.train_set
        if run.batch_augment is not None
        else SeededDataset(run.train_set, derive_seed(run.config.seed, epoch))
    )
    return DataLoader(
        dataset,
        batch_size=run.per_rank_batch,
        sampler=sampler,
        num_workers=run.config.num_workers,
        pin_memory=run.device.type == "cuda",
        drop_last=True,
        # Its own generator: creating the iterator must not draw from the global RNG, or a resumed epoch would see
        # different augmentation than the uninterrupted one.
        generator=torch.Generator().manual_seed(_epoch_seed(run.config.seed, epoch, run.dist_ctx.rank)),
        persistent_workers=False,
    )


def _val_loader(
    val_set: Dataset, config: TrainConfig, dist_ctx: DistContext, per_rank_batch: int, device: torch.device
) -> DataLoader:
    """This process's share of the validation images, every image exactly once across processes."""
    return DataLoader(
        val_set,
        batch_size=per_rank_batch,
        sampler=ShardSampler(len(val_set), dist_ctx),
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )


# --------------------------------------------------------------------------------------------------------------
# Helpers of the loop
# --------------------------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63 - 1)


def _batch_generator(run: _Run, state: _Progress) -> torch.Generator:
    """The random stream of the batch augmentation of this process's batch ``state.step_in_epoch``: a function of
    (seed, epoch, rank, batch) only, so a resumed epoch augments each batch as the uninterrupted one did."""
    seed = derive_seed(run.config.seed, state.epoch, run.dist_ctx.rank, state.step_in_epoch)
    return torch.Generator().manual_seed(seed)


def _amp_settings(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None, False
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, device.type == "cuda"


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next batch boundary and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum


@contextmanager
def _signal_handlers(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _progress(enabled: bool) -> Progress:
    return new_progress("stats", enabled=enabled, stderr=False)


def _running_stats(partial: dict[str, Any], elapsed: float, run: _Run, lr: float) -> str:
    """The progress bar's text: the epoch's loss, accuracy and speed so far, and the learning rate."""
    return (
        f"loss {partial['loss_sum'] / partial['seen']:.3f} "
        f"acc {partial['correct'] / partial['seen']:.1%} "
        f"{partial['seen'] * run.dist_ctx.world_size / max(elapsed, 1e-9):.0f} img/s lr {lr:.3g}"
    )


def _short_config(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={config[k]}" for k in ("alpha", "resolution", "num_classes", "small_input", "variant"))


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------------------------


def initialise_from(model: nn.Module, source: str) -> list[str]:
    """Copy weights into ``model`` from a checkpoint file or ``"torchvision"``/``"timm"`` published weights
    (:func:`mobilenet.convert.pretrained`), for fine-tuning. Every body tensor must match in shape (same
    architecture and width; the input resolution and ``small_input`` may differ, since they change no weight);
    the classifier is copied only when it has the same number of classes. Returns what was done, as notes."""
    if source in ("torchvision", "timm"):
        donor = pretrained(model.name or "", source)
        origin = f"{source}'s ImageNet weights"
    else:
        path = Path(source)
        if not path.is_file():
            raise MobileNetError(
                f"--init: {source} is not a file; expected a .safetensors checkpoint of this library or "
                "'torchvision'/'timm'"
            )
        donor = load_checkpoint(path).model
        origin = str(path)
    theirs = donor.state_dict()
    ours = model.state_dict()
    head = {key for key in ours if key.startswith("classifier.")}
    body = {key: tuple(value.shape) for key, value in ours.items() if key not in head}
    check_shapes(
        body,
        {key: tuple(value.shape) for key, value in theirs.items() if key not in head},
        what=f"--init: {origin}",
        target=model.name or "this model",
    )
    keep_head = all(k in theirs and theirs[k].shape == ours[k].shape for k in head)
    selected = {k: v for k, v in theirs.items() if k in ours and (keep_head or k not in head)}
    model.load_state_dict({**ours, **selected})
    notes = [f"initialised {len(selected)} of {len(ours)} tensors from {origin}"]
    if not keep_head:
        notes.append("the classifier starts fresh: the number of classes differs from the initial weights'")
    return notes
