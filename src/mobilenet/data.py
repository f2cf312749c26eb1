"""Data: where images come from, how they are transformed, and the preprocessing a checkpoint carries.

Sources (:func:`load_data`):

- an ImageFolder directory: ``DIR/train/<class>/*`` with ``DIR/val/`` or ``DIR/test/`` beside it, or a single
  ``DIR/<class>/*`` tree split into train and validation by a seeded fraction;
- ``cifar10`` / ``cifar100``: the real CIFAR-10 JPEG tree (``$MOBILENET_CIFAR10``, else
  ``~/.local/share/mobilenet/cifar10``) when present, otherwise torchvision's dataset (downloaded when the network
  is there; otherwise a clear error that says where to put the files);
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real scans, Alpaydin & Kaynak 1998, UCI), no
  download, upsampled to the model's resolution; the demo and the tests use it;
- a ``.pack`` file (:mod:`mobilenet.pack`): a whole image set's JPEG bytes in one file, decoded once in batches
  (on the GPU when there is one), for machines that get no dataset folder.

Transforms (torchvision.transforms.v2) are chosen by resolution, as the papers and the CIFAR literature do:

- "imagenet" style (input > 64 px): training uses RandomResizedCrop + horizontal flip (the Inception-style
  augmentation the V1 paper says it trained with, "less data augmentation" aside); evaluation resizes the short
  side to ``round(input / 0.875)`` and center-crops ``input`` (the 87.5% central crop of the TF-slim and
  torchvision evaluation of MobileNets);
- "small" style (input <= 64 px, e.g. CIFAR at 32x32): training pads by 1/8 of the side, randomly crops back and
  flips (He et al. 2016's CIFAR augmentation); evaluation only resizes to ``input`` (a no-op for CIFAR).

The :class:`Preprocessing` record (size, resize, mean, std, interpolation, style) is stored in every checkpoint, so
``predict``/``eval``/``export`` apply exactly what training used.
"""

from __future__ import annotations

import hashlib
import math
import os
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from mobilenet.errors import INSTALL_HINTS, MobileNetError
from mobilenet.images import IMAGE_SUFFIXES, BadImageError, decode_image, image_files_under, max_image_pixels
from mobilenet.io import is_within
from mobilenet.pack import decode_split, read_pack
from mobilenet.progress import progress_bar

__all__ = [
    "BUILTIN_DATA",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchSmallAugment",
    "DataBundle",
    "DeviceBatches",
    "EvalTransform",
    "ImageFolderDataset",
    "Preprocessing",
    "SeededDataset",
    "TensorImageDataset",
    "TransformedDataset",
    "build_eval_transform",
    "build_train_transform",
    "check_resize_fits",
    "check_seed",
    "cifar10_folder",
    "derive_seed",
    "load_data",
    "load_digits",
    "load_pack",
    "normalize_batch",
    "resolve_preprocessing",
    "style_for_resolution",
]

#: The data sources named rather than found at a path (a folder of the same name in the working directory is not read).
BUILTIN_DATA = ("digits", "cifar10", "cifar100")

Style = Literal["imagenet", "small"]
OnBadImage = Literal["skip", "error"]

#: ImageNet channel statistics (RGB, 0-1 scale), as used by torchvision and timm for every ImageNet model.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: CIFAR-10 training-set channel statistics (RGB, 0-1 scale), the values the CIFAR literature uses.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: CIFAR-100 training-set channel statistics.
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

#: Images at or below this side use the small-image style (pad-and-crop); above it, the ImageNet style.
SMALL_IMAGE_MAX = 64
#: The central crop fraction of ImageNet evaluation (TF-slim ``central_fraction=0.875``, torchvision 224/256).
CROP_FRACTION = 0.875
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: An image pack file (:mod:`mobilenet.pack`) given as the data source.
PACK_SUFFIX = ".pack"


def style_for_resolution(input_size: int) -> Style:
    """ "small" for inputs of at most 64 px (CIFAR-like), "imagenet" above."""
    return "small" if input_size <= SMALL_IMAGE_MAX else "imagenet"


@dataclass(frozen=True)
class Preprocessing:
    """What turns an image into the model's input: stored with the checkpoint (key ``"preprocessing"``).

    ``input_size``: the square side the model sees. ``resize_size``: the short side is resized to this before the
    center crop at evaluation (``round(input_size / 0.875)`` for ImageNet style, ``input_size`` for small images).
    ``mean``/``std``: per-channel normalisation on the 0-1 scale. ``interpolation``: the resize filter.
    ``style``: "imagenet" or "small" (which training augmentation produced the weights).
    """

    input_size: int
    resize_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    style: Style = "imagenet"

    def __post_init__(self) -> None:
        if not isinstance(self.input_size, int) or isinstance(self.input_size, bool) or self.input_size < 1:
            raise MobileNetError(f"preprocessing input_size must be a positive integer, got {self.input_size!r}")
        if not isinstance(self.resize_size, int) or isinstance(self.resize_size, bool) or self.resize_size < 1:
            raise MobileNetError(f"preprocessing resize_size must be a positive integer, got {self.resize_size!r}")
        if self.resize_size < self.input_size:
            raise MobileNetError(
                f"preprocessing resize_size ({self.resize_size}) must be at least input_size ({self.input_size}): "
                "the center crop cannot be larger than the resized image"
            )
        for key in ("mean", "std"):
            values = getattr(self, key)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise MobileNetError(f"preprocessing {key} must be a list of numbers, got {values!r}") from None
            if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
                raise MobileNetError(f"preprocessing {key} must be 1 or 3 finite numbers, got {list(values)}")
            if key == "std" and any(v <= 0 for v in values):
                raise MobileNetError(f"preprocessing std must be positive, got {list(values)}")
            object.__setattr__(self, key, values)
        if self.interpolation not in INTERPOLATIONS:
            raise MobileNetError(
                f"preprocessing interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.style not in ("imagenet", "small"):
            raise MobileNetError(f"preprocessing style must be 'imagenet' or 'small', got {self.style!r}")

    @classmethod
    def for_resolution(
        cls,
        input_size: int,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        style: Style | None = None,
    ) -> Preprocessing:
        """The default preprocessing for a model input of ``input_size`` px (style chosen by resolution)."""
        style = style or style_for_resolution(input_size)
        resize = round(input_size / CROP_FRACTION) if style == "imagenet" else input_size
        return cls(
            input_size=input_size,
            resize_size=resize,
            mean=tuple(mean) if mean is not None else IMAGENET_MEAN,
            std=tuple(std) if std is not None else IMAGENET_STD,
            style=style,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        if not isinstance(data, dict):
            raise MobileNetError(f"preprocessing must be a JSON object, got {type(data).__name__}")
        known = {"input_size", "resize_size", "mean", "std", "interpolation", "style"}
        missing = {"input_size", "resize_size"} - set(data)
        if missing:
            raise MobileNetError(
                f"preprocessing is missing {', '.join(sorted(missing))}; expected keys {sorted(known)}"
            )
        unknown = set(data) - known
        if unknown:
            raise MobileNetError(f"preprocessing has unknown key(s) {sorted(unknown)}; expected {sorted(known)}")
        return cls(**data)


def resolve_preprocessing(preprocessing: Preprocessing | dict[str, Any] | None, resolution: int) -> Preprocessing:
    """The preprocessing a model carries (validated), or, when it carries none, the default for its input
    resolution (:meth:`Preprocessing.for_resolution`). Prediction, evaluation and export all fall back here."""
    if preprocessing is None:
        return Preprocessing.for_resolution(int(resolution))
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    if hasattr(preprocessing, "to_dict"):
        preprocessing = preprocessing.to_dict()
    return Preprocessing.from_dict(dict(preprocessing))


def _as_preprocessing(preprocessing: Preprocessing | dict[str, Any]) -> Preprocessing:
    return preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.from_dict(preprocessing)


def _interpolation(name: str) -> Any:

    return InterpolationMode(name)


def check_resize_fits(height: int, width: int, short_side: int) -> None:
    """Refuse an image that, resized so its short side is ``short_side`` (as the transforms resize), would hold more
    than :func:`mobilenet.images.max_image_pixels` pixels: a few-KB PNG of one pixel by a million decodes within
    the decompression-bomb limit, yet its resized copy would take gigabytes. Raises :class:`BadImageError`."""
    short, long = min(height, width), max(height, width)
    if short < 1:
        return  # an empty image: the decoder has refused it already
    resized_long = int(short_side * long / short)  # torchvision's rule for a one-number resize
    pixels = short_side * resized_long
    limit = max_image_pixels()
    if pixels > limit:
        raise BadImageError(
            f"an image of {width}x{height} px resized to a short side of {short_side} px would hold {pixels:,} "
            f"pixels, over the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS, which guards against decompression "
            f"bombs); expected an aspect ratio of at most {max(limit // short_side**2, 1):,}:1"
        )


class _RefuseOversizedResize:
    """A transform step that passes an image through after :func:`check_resize_fits` (before the resize)."""

    def __init__(self, short_side: int) -> None:
        self.short_side = short_side

    def __call__(self, image: Any) -> Any:
        height, width = image.shape[-2:]
        check_resize_fits(int(height), int(width), self.short_side)
        return image

    def __repr__(self) -> str:
        return f"RefuseOversizedResize(short_side={self.short_side})"


def _normalize_tail(p: Preprocessing) -> list[Any]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(p.mean), std=list(p.std)), v2.ToPureTensor()]


class EvalTransform:
    """The evaluation transform of :func:`build_eval_transform`.

    A plain uint8 tensor (what :func:`mobilenet.images.decode_image` returns, one image or a batch) goes straight
    through torchvision's functional kernels; anything else (a PIL image, a float tensor, a ``tv_tensors`` image)
    through the equivalent ``v2.Compose``. Same kernels, same output; the direct calls skip v2's per-transform
    dispatch, which costs about as much as the crop, the scaling and the normalisation together on a single image.
    """

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing
        self.interpolation = _interpolation(preprocessing.interpolation)
        self.refuse_oversized = _RefuseOversizedResize(preprocessing.resize_size)
        self.compose = v2.Compose(
            [
                v2.ToImage(),
                self.refuse_oversized,
                v2.Resize(preprocessing.resize_size, interpolation=self.interpolation, antialias=True),
                v2.CenterCrop(preprocessing.input_size),
                *_normalize_tail(preprocessing),
            ]
        )

    def __call__(self, image: Any) -> torch.Tensor:
        if type(image) is not torch.Tensor or image.dtype != torch.uint8 or image.ndim < 3:
            return self.compose(image)
        p = self.preprocessing
        x = self.refuse_oversized(image)
        x = v2.functional.resize(x, [p.resize_size], interpolation=self.interpolation, antialias=True)
        x = v2.functional.center_crop(x, [p.input_size, p.input_size])
        x = v2.functional.to_dtype(x, torch.float32, scale=True)
        return v2.functional.normalize(x, mean=list(p.mean), std=list(p.std))

    def __repr__(self) -> str:
        return f"EvalTransform({self.compose!r})"


def build_eval_transform(preprocessing: Preprocessing | dict[str, Any]) -> EvalTransform:
    """The evaluation transform: uint8 CHW tensor (or PIL image) -> normalised float32 CHW tensor.

    Resize the short side to ``resize_size``, center-crop ``input_size``, scale to 0-1, normalise. For ImageNet
    style that is the 87.5% central crop the MobileNet papers' numbers are measured with (TF-slim's
    ``preprocess_for_eval``; torchvision's ``ImageClassification`` with resize 256 / crop 224).
    """
    return EvalTransform(_as_preprocessing(preprocessing))


def build_train_transform(
    preprocessing: Preprocessing | dict[str, Any],
    *,
    flip: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
) -> Callable[[Any], torch.Tensor]:
    """The training transform for the preprocessing's style (uint8 CHW tensor or PIL -> float32 CHW tensor).

    - "imagenet": RandomResizedCrop(input, scale) + horizontal flip. ``scale`` defaults to Inception's
      (0.08, 1); the V1 paper notes small models overfit less and need "less data augmentation", so a larger lower
      bound (e.g. 0.25 or 0.35 for the smallest widths, as timm's recipes do) is a reasonable override.
    - "small": resize to input (no-op for CIFAR), pad by input/8 with reflection, random crop, horizontal flip
      (He et al. 2016, section 4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled").
    """
    p = _as_preprocessing(preprocessing)
    steps: list[Any] = [v2.ToImage()]
    if p.style == "imagenet":
        steps.append(
            v2.RandomResizedCrop(
                p.input_size, scale=scale, interpolation=_interpolation(p.interpolation), antialias=True
            )
        )
    else:
        steps += [
            _RefuseOversizedResize(p.input_size),
            v2.Resize(p.input_size, interpolation=_interpolation(p.interpolation), antialias=True),
            v2.CenterCrop(p.input_size),
            v2.RandomCrop(p.input_size, padding=max(1, p.input_size // 8), padding_mode="reflect"),
        ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *_normalize_tail(p)])


class BatchSmallAugment:
    """The small-image training augmentation on a whole uint8 batch at once (``N x C x H x W`` -> float32).

    The same distribution as :func:`build_train_transform` in "small" style for images already at the input size:
    reflect-pad by ``input/8``, take a random ``input x input`` crop per image, flip half of them, normalise. One
    vectorised pass per batch instead of a per-image pipeline: on CIFAR on 2 CPU cores the per-image pipeline costs
    about as much as a small model's training step, and a data-loading worker would take one of the two cores.
    """

    def __init__(self, preprocessing: Preprocessing | dict[str, Any], *, flip: bool = True) -> None:
        self.p = _as_preprocessing(preprocessing)
        if self.p.style != "small":
            raise ValueError("BatchSmallAugment is the small-image style only")
        self.flip = flip
        self.pad = max(1, self.p.input_size // 8)
        self.mean = torch.tensor(self.p.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(self.p.std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``images`` where they are (CPU or GPU). The crops and flips are drawn from ``generator`` on the
        CPU whatever the images' device, so a batch is augmented alike on every device and a resumed run, which
        reseeds the generator per batch, sees the same crops."""
        n, _, h, w = images.shape
        size, pad = self.p.input_size, self.pad
        if (h, w) != (size, size):
            raise ValueError(f"BatchSmallAugment expects {size}x{size} images, got {h}x{w}")
        device = images.device
        top = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device, non_blocking=True)
        left = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device, non_blocking=True)
        mirror = (torch.rand(n, generator=generator) < 0.5).to(device, non_blocking=True) if self.flip else None
        x = torch.nn.functional.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
        # Gather every image's crop with one advanced-indexing op: rows[i] = top[i] + 0..size-1, likewise columns.
        steps = torch.arange(size, device=device)
        rows = (top[:, None] + steps)[:, None, :, None]
        cols = (left[:, None] + steps)[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        x = x[batch, torch.arange(x.shape[1], device=device)[None, :, None, None], rows, cols]
        if mirror is not None:
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        return (x / 255.0 - self.mean.to(device)) / self.std.to(device)


def normalize_batch(images: torch.Tensor, preprocessing: Preprocessing | dict[str, Any]) -> torch.Tensor:
    """A uint8 ``N x C x H x W`` batch already at the input size as the model's float32 input, where it is: the
    small-image evaluation transform (:func:`build_eval_transform` resizes nothing then) on a whole batch."""
    p = _as_preprocessing(preprocessing)
    mean = torch.tensor(p.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(p.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


class DeviceBatches:
    """Batches of a :class:`TensorImageDataset` copied once to ``device``: each batch is one gather on the device,
    in the order of ``indices`` (the sampler's, so resume and processes see the batches the DataLoader would
    give), with no loader workers. ``transform`` (e.g. :func:`normalize_batch`) is applied per batch on the device;
    without it the uint8 images are yielded for a per-batch augmentation such as :class:`BatchSmallAugment`.

    On a GPU this keeps the data from ever waiting on the CPU; on the CPU it runs the same code (the tests)."""

    def __init__(
        self,
        dataset: TensorImageDataset,
        device: torch.device | str,
        *,
        batch_size: int,
        drop_last: bool = True,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.transform = transform
        self.indices: torch.Tensor | None = None

    def with_order(self, indices: Sequence[int] | torch.Tensor) -> DeviceBatches:
        """Take the batches in the order of ``indices`` (all images in order when never called)."""
        self.indices = torch.as_tensor(indices, dtype=torch.long).to(self.device)
        return self

    def __len__(self) -> int:
        count = len(self.indices) if self.indices is not None else self.images.shape[0]
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices
        count = len(order) if order is not None else self.images.shape[0]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = min(start + self.batch_size, count)
            if order is None:
                images, labels = self.images[start:stop], self.labels[start:stop]
            else:
                chosen = order[start:stop]
                images, labels = self.images[chosen], self.labels[chosen]
            yield (self.transform(images) if self.transform is not None else images), labels


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor ``N x C x H x W`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 NCHW, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` files, decoded with torchvision.io (no PIL needed), as uint8 RGB CHW tensors.

    ``on_bad_image="error"`` raises :class:`BadImageError` naming the file; ``"skip"`` drops the file (it is
    recorded in ``bad_files``) and returns the next good image, so one bad file does not stop a long run.
    ``in_memory=True`` decodes everything once (with a progress bar): worth it for small images such as CIFAR,
    where decoding each epoch costs more than the model on 2 cores.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        classes: Sequence[str] | None = None,
        on_bad_image: OnBadImage = "error",
        in_memory: bool = False,
        files: Sequence[tuple[Path, int]] | None = None,
    ) -> None:
        if on_bad_image not in ("skip", "error"):
            raise MobileNetError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        self.root = Path(root)
        self.on_bad_image = on_bad_image
        self.bad_files: list[Path] = []
        found = scan_class_folders(self.root)
        if classes is not None and list(classes) != list(found):
            raise MobileNetError(_class_mismatch_message(self.root, list(classes), list(found)))
        self.classes = list(found)
        self.samples: list[tuple[Path, int]] = (
            list(files)
            if files is not None
            else [(path, label) for label, name in enumerate(self.classes) for path in found[name]]
        )
        self._cache: list[torch.Tensor | None] | None = None
        if in_memory:
            self._load_all()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def subset(self, indices: Sequence[int]) -> ImageFolderDataset:
        clone = ImageFolderDataset.__new__(ImageFolderDataset)
        clone.root, clone.on_bad_image, clone.bad_files, clone.classes = (
            self.root,
            self.on_bad_image,
            self.bad_files,
            self.classes,
        )
        clone.samples = [self.samples[i] for i in indices]
        clone._cache = None if self._cache is None else [self._cache[i] for i in indices]
        return clone

    def _load_all(self) -> None:
        cache: list[torch.Tensor | None] = []
        with progress_bar(len(self.samples), f"decoding {self.root}", transient=True) as advance:
            for path, _ in self.samples:
                cache.append(self._decode(path))
                advance(1)
        self._cache = cache

    def _decode(self, path: Path) -> torch.Tensor | None:
        try:
            return decode_image(path)
        except BadImageError as error:
            if self.on_bad_image == "error":
                raise BadImageError(f"{error}; fix or remove the file, or pass --on-bad-image skip") from None
            self.bad_files.append(path)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # With "skip", a bad file is replaced by the next good one so batch shapes stay fixed.
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, label = self.samples[i]
            image = self._cache[i] if self._cache is not None else self._decode(path)
            if image is not None:
                return image, label
        raise MobileNetError(f"no image under {self.root} could be decoded; expected JPEG/PNG files")


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for ``root/<class>/*``; raises a clear error for every way it can fail."""
    if not root.exists():
        raise MobileNetError(f"data directory {root} does not exist; expected a folder of class sub-folders")
    if not root.is_dir():
        raise MobileNetError(f"data path {root} is not a directory; expected a folder of class sub-folders")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        if any(root.iterdir()):
            raise MobileNetError(
                f"no class folders in {root}; expected one sub-folder per class, e.g. {root}/cat/*.jpg"
            )
        raise MobileNetError(
            f"data directory {root} is empty; expected one sub-folder per class, e.g. {root}/cat/*.jpg"
        )
    found: dict[str, list[Path]] = {}
    for class_dir in class_dirs:
        _check_class_name(class_dir)
        _check_not_an_ancestor(class_dir, root)
        files = image_files_under(class_dir)
        if not files:
            raise MobileNetError(
                f"class folder {class_dir} has no images; expected files ending in {', '.join(IMAGE_SUFFIXES[:4])}..."
            )
        found[class_dir.name] = files
    if len(found) < 2:
        raise MobileNetError(f"{root} has only one class folder ({class_dirs[0].name}); a classifier needs at least 2")
    return found


def _check_not_an_ancestor(class_dir: Path, root: Path) -> None:
    """A class folder that is a link to the data folder or to a folder above it (``cat -> /``) holds the data folder
    itself: its scan would read every class again and everything beside them, the whole filesystem for ``/``."""
    if is_within(root, class_dir):  # a link that cannot be resolved (a loop) is reported by the scan
        raise MobileNetError(
            f"class folder {class_dir} is a link to {class_dir.resolve()}, which holds the data folder {root} itself; "
            "expected a folder of that class's images"
        )


def _check_class_name(class_dir: Path) -> None:
    """A class folder's name becomes a label in the checkpoint's JSON, tables and plots: it must be text (a name
    that is not UTF-8 reaches Python as lone surrogates, which no encoder or font takes) without control
    characters (a newline splits every table row and message it appears in)."""
    name = class_dir.name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        problem = "is not UTF-8 text"
    else:
        if not any(unicodedata.category(char) == "Cc" for char in name):
            return
        problem = "holds a control character"
    raise MobileNetError(
        f"class folder name {os.fsencode(name)!r} in {class_dir.parent} {problem}; class names become the model's "
        "labels: rename the folder"
    )


def _class_mismatch_message(root: Path, expected: list[str], found: list[str]) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if extra:
        parts.append(f"extra {', '.join(extra)}")
    return (
        f"the classes in {root} differ from the training classes ({'; '.join(parts) or 'different order'}); "
        f"expected exactly: {', '.join(expected)}"
    )


class TransformedDataset(Dataset):
    """A dataset of ``(uint8 image, label)`` with a transform applied to the image."""

    def __init__(self, base: Dataset, transform: Callable[[Any], torch.Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        try:
            return self.transform(image), label
        except BadImageError as error:  # the transform knows the image, not its file: name the file when known
            samples = getattr(self.base, "samples", None)
            if samples is None:
                raise
            raise BadImageError(f"image {samples[index][0]}: {error}; fix or remove the file") from None


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (the first 8 bytes of the SHA-256 of their digits):
    nearby inputs (epoch 3 and 4, sample 10 and 11) give unrelated streams."""
    digest = hashlib.sha256(",".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededDataset(Dataset):
    """``base`` whose item ``i`` is produced with torch's RNG seeded from ``derive_seed(seed, i)``.

    The random transforms of torchvision draw from the global RNG of the process that runs them: in a data-loading
    worker that stream depends on which items the worker produced before, so an epoch resumed part-way (whose
    batches go to other workers) would see other crops and flips than the uninterrupted epoch. Seeded per item, the
    augmentation is a function of (seed, index) alone. The caller's RNG state is restored after each item, so
    loading in the main process (``num_workers=0``) leaves its random stream (dropout) untouched.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, index))
            return self.base[index]


# --------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """What :func:`load_data` returns: raw (uint8) train and validation sets, class names, and statistics.

    ``train``/``val`` yield uint8 CHW tensors; :meth:`preprocessing` picks the transforms' parameters for a model
    input size, and :meth:`train_dataset`/:meth:`val_dataset` wrap the sets with the transforms.
    """

    name: str
    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    native_size: int | None = None  # the images' own side when all are the same (32 for CIFAR)
    val_name: str = "val"
    notes: list[str] = field(default_factory=list)

    def preprocessing(self, input_size: int) -> Preprocessing:
        return Preprocessing.for_resolution(input_size, mean=self.mean, std=self.std)

    def train_dataset(self, preprocessing: Preprocessing, **kwargs: Any) -> TransformedDataset:
        return TransformedDataset(self.train, build_train_transform(preprocessing, **kwargs))

    def val_dataset(self, preprocessing: Preprocessing) -> TransformedDataset:
        return TransformedDataset(self.val, build_eval_transform(preprocessing))


def user_data_dir() -> Path:
    """The user's data directory for this library: ``$XDG_DATA_HOME/mobilenet`` (``~/.local/share/mobilenet``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mobilenet"


def cifar10_folder() -> Path | None:
    """The real CIFAR-10 ImageFolder tree (``train/<class>/*.jpg``, ``test/<class>/*.jpg``): ``$MOBILENET_CIFAR10``,
    else :func:`user_data_dir` ``/cifar10``; ``None`` when neither holds one. A ``$MOBILENET_CIFAR10`` that holds
    no such tree is refused: the user asked for that folder, and falling back to a download would hide the typo."""
    env = os.environ.get("MOBILENET_CIFAR10")
    if env:
        folder = Path(env)
        if not ((folder / "train").is_dir() and (folder / "test").is_dir()):
            raise MobileNetError(
                f"MOBILENET_CIFAR10={env} holds no CIFAR-10 ImageFolder tree (train/<class>/*.jpg and "
                "test/<class>/*.jpg); point it at one, or unset it to use the download"
            )
        return folder
    candidate = user_data_dir() / "cifar10"
    return candidate if (candidate / "train").is_dir() and (candidate / "test").is_dir() else None


def data_root() -> Path:
    """Where torchvision datasets are downloaded: ``$MOBILENET_DATA`` or ``~/.cache/mobilenet/data``."""
    return Path(os.environ.get("MOBILENET_DATA", Path.home() / ".cache" / "mobilenet" / "data"))


def load_digits(*, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans with 17 grey levels, 10 classes), upsampled
    bilinearly to ``size`` px and repeated to 3 channels so every RGB model and tool applies unchanged.

    Split per class by a seeded fraction (stratified, so the small validation set has every digit).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise MobileNetError(
            f"the built-in 'digits' dataset needs scikit-learn; install it with: {INSTALL_HINTS['demo']}"
        ) from None
    raw = sk_load_digits()
    images = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0  # grey levels 0..16
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    labels = torch.as_tensor(raw.target, dtype=torch.long)
    train_idx, val_idx = stratified_split(labels.tolist(), val_fraction, seed)
    classes = [str(d) for d in range(10)]
    train = TensorImageDataset(images[train_idx], labels[train_idx], classes)
    val = TensorImageDataset(images[val_idx], labels[val_idx], classes)
    mean, std = channel_stats(train.images)
    return DataBundle("digits", train, val, classes, mean=mean, std=std, native_size=size)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) of a uint8 NCHW tensor."""
    x = images.float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


#: The seeds torch's generators take (``torch.manual_seed``): a 64-bit integer, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` if torch's generators can take it, else :class:`MobileNetError` naming ``what``."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise MobileNetError(f"{what} must be an integer from {low} to {high} (a 64-bit seed), got {seed!r}")
    return seed


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices per class: ``val_fraction`` of each class (at least one image) to validation, seeded."""
    number = isinstance(val_fraction, int | float) and not isinstance(val_fraction, bool)
    if not number or not 0.0 < val_fraction < 1.0:  # a string from the API compared as a TypeError
        raise MobileNetError(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    check_seed(seed, "--seed")
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(by_class):
        indices = by_class[label]
        order = torch.randperm(len(indices), generator=generator).tolist()
        n_val = max(1, round(len(indices) * val_fraction)) if len(indices) > 1 else 0
        val += [indices[i] for i in order[:n_val]]
        train += [indices[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


def uniform_small_size(files: Sequence[Path]) -> int | None:
    """The side of ``files``' images when every one is the same square of at most :data:`SMALL_IMAGE_MAX` px (as
    CIFAR's 32x32), read from the headers alone; None otherwise. Files whose header cannot be read are left to the
    decoder, which reports them."""
    sizes: set[tuple[int, int]] = set()
    for path in files:
        try:
            with Image.open(path) as header:
                width, height = header.size
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        sizes.add((width, height))
        # Stop at the first image that rules it out: a folder of large photos is not read to its end.
        if len(sizes) > 1 or width != height or width > SMALL_IMAGE_MAX:
            return None
    if len(sizes) != 1:
        return None
    ((width, height),) = sizes
    return width if width == height <= SMALL_IMAGE_MAX else None


def _folder_bundle(name: str, train: Any, val: Any, classes: list[str], **fields: Any) -> DataBundle:
    files = [path for dataset in (train, val) for path, _ in dataset.samples]
    native = uniform_small_size(files)
    notes = list(fields.pop("notes", []))
    if native is not None:
        notes.append(f"every image is {native}x{native} px: that is the default input resolution")
    return DataBundle(name, train, val, classes, native_size=native, notes=notes, **fields)


def _load_folder(
    root: Path, *, val_fraction: float, seed: int, on_bad_image: OnBadImage, in_memory: bool, name: str
) -> DataBundle:
    train_dir = root / "train"
    if train_dir.is_dir():
        val_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        train = ImageFolderDataset(train_dir, on_bad_image=on_bad_image, in_memory=in_memory)
        if val_dir is not None:
            val = ImageFolderDataset(val_dir, classes=train.classes, on_bad_image=on_bad_image, in_memory=in_memory)
            return _folder_bundle(name, train, val, train.classes, val_name=val_dir.name)
        full = train
    else:
        full = ImageFolderDataset(root, on_bad_image=on_bad_image, in_memory=in_memory)
    train_idx, val_idx = stratified_split(full.targets, val_fraction, seed)
    note = f"no val/ or test/ folder: {val_fraction:.0%} of each class held out for validation (seed {seed})"
    return _folder_bundle(
        name, full.subset(train_idx), full.subset(val_idx), full.classes, val_name="val (held out)", notes=[note]
    )


def _load_torchvision_cifar(name: str, *, download: bool) -> DataBundle:
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = data_root()
    try:
        train_set = cls(str(root), train=True, download=download)
        test_set = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as error:
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        raise MobileNetError(
            f"{name} is not available and could not be downloaded ({str(error).splitlines()[0]}); put torchvision's "
            f"{archive} (from https://www.cs.toronto.edu/~kriz/) extracted under {root} (or set MOBILENET_DATA), "
            "or point MOBILENET_CIFAR10 at an ImageFolder tree with train/ and test/ (or pass that path as the data)"
        ) from None

    def to_tensor_set(ds: Any) -> TensorImageDataset:
        images = torch.as_tensor(ds.data).permute(0, 3, 1, 2).contiguous()
        return TensorImageDataset(images, torch.as_tensor(ds.targets), ds.classes)

    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    train = to_tensor_set(train_set)
    return DataBundle(name, train, to_tensor_set(test_set), train.classes, mean, std, native_size=32, val_name="test")


def pack_decode_device() -> str:
    """Where image packs are decoded: the GPU (nvJPEG) when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pack(path: str | os.PathLike[str], *, device: str | None = None) -> DataBundle:
    """An image pack (:mod:`mobilenet.pack`) with a ``train`` split and a ``val`` or ``test`` one, decoded once
    (on ``device``; None: :func:`pack_decode_device`) into in-memory uint8 sets. CIFAR-10 gets its published
    channel statistics, any other set its own training set's."""
    pack = read_pack(path)
    val_name = next((name for name in ("val", "test") if name in pack.splits), None)
    if "train" not in pack.splits or val_name is None:
        raise MobileNetError(f"{path}: an image pack for training needs a 'train' and a 'val' or 'test' split")
    device = device or pack_decode_device()
    try:
        sets = {name: decode_split(pack.splits[name], device=device) for name in ("train", val_name)}
    except RuntimeError:
        if device == "cpu":
            raise
        sets = {name: decode_split(pack.splits[name], device="cpu") for name in ("train", val_name)}
    train = TensorImageDataset(sets["train"], pack.splits["train"].labels, pack.classes)
    val = TensorImageDataset(sets[val_name], pack.splits[val_name].labels, pack.classes)
    side = train.images.shape[-1] if train.images.shape[-1] == train.images.shape[-2] else None
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if pack.name == "cifar10" else channel_stats(train.images)
    native = side if side is not None and side <= SMALL_IMAGE_MAX else None
    return DataBundle(pack.name, train, val, pack.classes, mean, std, native_size=native, val_name=val_name)


def load_data(
    source: str | os.PathLike[str],
    *,
    val_fraction: float | None = None,
    seed: int = 0,
    on_bad_image: OnBadImage = "error",
    in_memory: bool | None = None,
    download: bool = True,
    digits_size: int = 32,
) -> DataBundle:
    """Open a data source: ``"digits"``, ``"cifar10"``, ``"cifar100"``, or an ImageFolder directory.

    ``val_fraction`` (used only where no validation split exists) defaults to 0.1, and 0.2 for the small digits
    set so its validation accuracy is not too noisy. ``in_memory`` (default: on for CIFAR, off for folders) decodes
    every image once up front.
    """
    if on_bad_image not in ("skip", "error"):
        raise MobileNetError(f"--on-bad-image must be 'skip' or 'error', got {on_bad_image!r}")
    text = str(source)
    if not text:  # Path("") is the working directory, which was then read as the data folder
        raise MobileNetError(
            f"the data source is empty ({text!r}); expected {', '.join(map(repr, BUILTIN_DATA))} or a directory of "
            "class folders"
        )
    if text == "digits":
        return load_digits(size=digits_size, val_fraction=0.2 if val_fraction is None else val_fraction, seed=seed)
    val_fraction = 0.1 if val_fraction is None else val_fraction
    if text in ("cifar10", "cifar100"):
        folder = cifar10_folder() if text == "cifar10" else None
        if folder is None:
            return _load_torchvision_cifar(text, download=download)
        bundle = _load_folder(
            folder,
            val_fraction=val_fraction,
            seed=seed,
            on_bad_image=on_bad_image,
            in_memory=True if in_memory is None else in_memory,
            name="cifar10",
        )
        bundle.mean, bundle.std, bundle.native_size = CIFAR10_MEAN, CIFAR10_STD, 32
        return bundle
    path = Path(text).expanduser()
    if not path.exists():
        raise MobileNetError(
            f"data source {text!r} not found; expected 'digits', 'cifar10', 'cifar100' or a directory of class folders"
        )
    if path.is_file() and path.suffix == PACK_SUFFIX:
        return load_pack(path)
    return _load_folder(
        path,
        val_fraction=val_fraction,
        seed=seed,
        on_bad_image=on_bad_image,
        in_memory=bool(in_memory),
        name=path.name,
    )


def iterate_loader(loader: Any) -> Iterator[Any]:
    """Iterate ``loader``; a user error raised in a worker process (a corrupt image) comes back from PyTorch as a
    multi-line message with the worker's traceback: keep only the original one-line message."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except MobileNetError as error:
            text = str(error)
            if "Original Traceback" not in text:
                raise
            last = [line for line in text.splitlines() if line.strip()][-1]
            raise type(error)(last.split(": ", 1)[1] if ": " in last else last) from None
        yield batch
