"""Data sources, transforms and the Preprocessing record (the checkpoint contract)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png
from torchvision.transforms import v2

from mobilenet.data import (
    CIFAR10_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceBatches,
    ImageFolderDataset,
    Preprocessing,
    TensorImageDataset,
    build_eval_transform,
    build_train_transform,
    load_data,
    load_digits,
    normalize_batch,
    scan_class_folders,
    stratified_split,
)
from mobilenet.errors import MobileNetError
from mobilenet.pack import write_pack


def write_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 20, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            data = encode_png(image) if i % 2 else encode_jpeg(image)
            (root / name / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(bytes(data.numpy()))
    return root


def test_preprocessing_round_trip_and_defaults():
    p = Preprocessing.for_resolution(224)
    # ImageNet evaluation: resize 256, center crop 224 (torchvision's MobileNet_V2_Weights transforms, TF-slim 0.875).
    assert (p.input_size, p.resize_size, p.style) == (224, 256, "imagenet")
    assert p.mean == IMAGENET_MEAN and p.std == IMAGENET_STD
    small = Preprocessing.for_resolution(32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert (small.resize_size, small.style) == (32, "small")
    data = small.to_dict()
    assert set(data) == {"input_size", "resize_size", "mean", "std", "interpolation", "style"}
    assert Preprocessing.from_dict(data) == small
    import json

    assert Preprocessing.from_dict(json.loads(json.dumps(data))) == small


@pytest.mark.parametrize(
    "bad",
    [
        {"input_size": 0, "resize_size": 32},
        {"input_size": 32, "resize_size": 16},
        {"input_size": 32, "resize_size": 32, "std": [0, 1, 1]},
        {"input_size": 32, "resize_size": 32, "interpolation": "lanczos9"},
        {"input_size": 32, "resize_size": 32, "style": "fancy"},
        {"input_size": 32},
        {"input_size": 32, "resize_size": 32, "extra": 1},
    ],
)
def test_preprocessing_rejects_bad_values(bad):
    with pytest.raises(MobileNetError):
        Preprocessing.from_dict(bad)


def test_eval_transform_matches_torchvision_reference():
    # Reference: torchvision's own ImageNet eval preset (resize 256 bilinear antialiased, crop 224, normalise).
    from torchvision.transforms._presets import ImageClassification

    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = build_eval_transform(Preprocessing.for_resolution(224).to_dict())(image)
    reference = ImageClassification(crop_size=224, resize_size=256)(image)
    assert ours.dtype == torch.float32 and ours.shape == (3, 224, 224)
    assert type(ours) is torch.Tensor
    # torchvision's v1 and v2 uint8 resize kernels round differently by at most one grey level (1/255).
    one_level = 1.001 / 255 / min(IMAGENET_STD)
    torch.testing.assert_close(ours, reference, atol=one_level, rtol=0)
    assert (ours - reference).abs().mean() < 0.25 * one_level  # most pixels identical


@pytest.mark.parametrize(
    ("size", "shape"),
    [(224, (3, 224, 224)), (224, (3, 300, 401)), (160, (3, 97, 500)), (32, (3, 32, 32)), (96, (5, 3, 120, 96))],
)
def test_eval_transform_direct_path_equals_torchvisions_compose(size, shape):
    # Reference: the same steps as torchvision's own v2.Compose (ToImage, Resize, CenterCrop, ToDtype, Normalize).
    p = Preprocessing.for_resolution(size)
    reference = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(p.resize_size, antialias=True),
            v2.CenterCrop(p.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(p.mean), std=list(p.std)),
        ]
    )
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    transform = build_eval_transform(p)
    ours = transform(image)
    assert type(ours) is torch.Tensor and ours.shape == (*shape[:-3], 3, size, size)
    assert torch.equal(ours, reference(image).as_subclass(torch.Tensor))
    # A PIL image and a float tensor take the Compose path: the same numbers.
    if len(shape) == 3:
        pil = v2.functional.to_pil_image(image)
        assert torch.equal(transform(pil), ours)
    assert torch.equal(transform(image.float() / 255), reference(image.float() / 255).as_subclass(torch.Tensor))


def test_small_eval_transform_is_normalisation_only():
    p = Preprocessing.for_resolution(32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    out = build_eval_transform(p)(image)
    expected = (image.float() / 255 - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) / torch.tensor([0.2, 0.25, 0.3])[
        :, None, None
    ]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_train_transforms_shapes_and_randomness():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    big = build_train_transform(Preprocessing.for_resolution(96))
    assert big(image).shape == (3, 96, 96)
    small = build_train_transform(Preprocessing.for_resolution(32))
    cifar = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    outs = [small(cifar) for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # pad-crop/flip actually vary


def test_digits_dataset_is_real_and_split_stratified():
    bundle = load_digits(size=32, val_fraction=0.2, seed=0)
    assert bundle.classes == [str(i) for i in range(10)]
    # scikit-learn's digits set has 1797 images (sklearn.datasets.load_digits documentation).
    assert len(bundle.train) + len(bundle.val) == 1797
    image, label = bundle.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and 0 <= label < 10
    assert set(bundle.val.targets) == set(range(10))
    again = load_digits(size=32, val_fraction=0.2, seed=0)
    assert torch.equal(again.val.images, bundle.val.images)


def test_stratified_split_is_disjoint_and_seeded():
    labels = [i % 3 for i in range(30)]
    train, val = stratified_split(labels, 0.2, seed=5)
    assert not set(train) & set(val) and len(train) + len(val) == 30
    assert sorted(labels[i] for i in val) == [0, 0, 1, 1, 2, 2]
    assert stratified_split(labels, 0.2, seed=5) == (train, val)
    assert stratified_split(labels, 0.2, seed=6) != (train, val)
    with pytest.raises(MobileNetError, match="between 0 and 1"):
        stratified_split(labels, 1.5, 0)


def test_stratified_split_refuses_a_fraction_that_is_not_a_number():
    """evaluate_checkpoint(val_fraction="0.1") was a TypeError from the comparison."""
    for fraction in ("0.1", None, True, [0.1]):
        with pytest.raises(MobileNetError, match="validation fraction must be between 0 and 1"):
            stratified_split([0, 0, 1, 1], fraction, 0)


def test_folder_with_train_and_val(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "val", per_class=2, seed=1)
    bundle = load_data(tmp_path)
    assert bundle.classes == ["cat", "dog"] and len(bundle.train) == 8 and len(bundle.val) == 4
    p = bundle.preprocessing(32)
    x, y = bundle.val_dataset(p)[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_single_tree_is_split_by_fraction(tmp_path):
    write_folder(tmp_path, per_class=10)
    bundle = load_data(tmp_path, val_fraction=0.2, seed=0)
    assert len(bundle.train) == 16 and len(bundle.val) == 4
    assert bundle.notes and "held out" in bundle.notes[0]


def test_an_empty_data_source_is_not_the_working_directory(tmp_path, monkeypatch):
    """``--data ""`` was Path(""), the working directory, read as a folder of classes (its subfolders)."""
    write_folder(tmp_path, classes=("cat", "dog"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MobileNetError, match=r"the data source is empty \(''\); expected 'digits'"):
        load_data("")


def test_folder_errors(tmp_path):
    with pytest.raises(MobileNetError, match="not found"):
        load_data(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MobileNetError, match="is empty"):
        load_data(tmp_path / "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(b"x")
    with pytest.raises(MobileNetError, match="no class folders"):
        load_data(flat)
    write_folder(tmp_path / "mismatch" / "train", classes=("cat", "dog"))
    write_folder(tmp_path / "mismatch" / "val", classes=("cat", "bird"))
    with pytest.raises(MobileNetError, match=r"missing dog.*extra bird"):
        load_data(tmp_path / "mismatch")


def test_corrupt_image_error_names_the_path_or_is_skipped(tmp_path):
    root = write_folder(tmp_path / "data", per_class=3)
    good = (root / "cat" / "0.jpg").read_bytes()
    bad = root / "cat" / "0.jpg"
    bad.write_bytes(good[: len(good) // 3])  # truncated JPEG
    with pytest.raises(MobileNetError, match=r"cannot decode image .*0\.jpg"):
        ImageFolderDataset(root)[0]
    skipping = ImageFolderDataset(root, on_bad_image="skip")
    image, _ = skipping[0]
    assert image.shape == (3, 20, 20) and skipping.bad_files == [bad]
    with pytest.raises(MobileNetError, match="on_bad_image"):
        ImageFolderDataset(root, on_bad_image="ignore")


def test_real_cifar10_folder(cifar10):
    dataset = ImageFolderDataset(cifar10 / "test")
    assert len(dataset.classes) == 10 and len(dataset) == 10000
    image, _ = dataset[0]
    assert image.shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["missing", "file", "fifo", "empty-dir", "train-only"])
def test_a_cifar10_variable_that_holds_no_tree_is_refused_not_replaced_by_a_download(kind, tmp_path, monkeypatch):
    target = tmp_path / "c10"
    if kind == "file":
        target.write_text("not a folder")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "empty-dir":
        target.mkdir()
    elif kind == "train-only":
        (target / "train" / "cat").mkdir(parents=True)
    monkeypatch.setenv("MOBILENET_CIFAR10", str(target))
    monkeypatch.setenv("MOBILENET_DATA", str(tmp_path / "download"))  # never reached
    with pytest.raises(MobileNetError, match=r"MOBILENET_CIFAR10=.* holds no CIFAR-10 ImageFolder tree"):
        load_data("cifar10")
    assert not (tmp_path / "download").exists()


def test_a_cifar10_variable_naming_a_tree_is_used(tmp_path, monkeypatch):
    from mobilenet.data import cifar10_folder

    for split in ("train", "test"):
        write_folder(tmp_path / "c10" / split, per_class=1)
    monkeypatch.setenv("MOBILENET_CIFAR10", str(tmp_path / "c10"))
    assert cifar10_folder() == tmp_path / "c10"
    monkeypatch.setenv("MOBILENET_CIFAR10", "")  # empty: as if unset
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "none"))
    assert cifar10_folder() is None


def test_worker_errors_come_back_as_one_line(tmp_path):
    from torch.utils.data import DataLoader

    from mobilenet.data import iterate_loader

    root = write_folder(tmp_path / "data", per_class=2)
    (root / "cat" / "0.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    loader = DataLoader(ImageFolderDataset(root), batch_size=4, num_workers=1)
    with pytest.raises(MobileNetError) as caught:
        list(iterate_loader(loader))
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "0.jpg" in message and "Traceback" not in message


def test_batch_small_augment_crops_flips_and_normalises():
    from mobilenet.data import BatchSmallAugment

    p = Preprocessing.for_resolution(32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = BatchSmallAugment(p)(images, generator=torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    # Each output is one of the (2*4+1)^2 crops of the reflect-padded image, possibly mirrored, then normalised
    # exactly as the evaluation transform normalises (checked against build_eval_transform's output).
    normalised = torch.stack([build_eval_transform(p)(img) for img in images])
    padded = torch.nn.functional.pad(normalised, (4, 4, 4, 4), mode="reflect")
    flips = 0
    for k in range(16):
        candidates = [padded[k, :, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        match = [c for c in candidates if torch.allclose(c, out[k], atol=1e-5)]
        mirrored = [c for c in candidates if torch.allclose(c.flip(2), out[k], atol=1e-5)]
        assert match or mirrored
        flips += bool(mirrored and not match)
    assert 0 < flips < 16  # both mirrored and unmirrored images occur


def test_seeded_dataset_items_depend_on_seed_and_index_only():
    from mobilenet.data import SeededDataset, derive_seed

    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.rand(3)

    data = SeededDataset(Noisy(), seed=7)
    forward = [data[i] for i in range(4)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    backward = [data[i] for i in reversed(range(4))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert not torch.equal(forward[0], forward[1])
    assert not torch.equal(forward[0], SeededDataset(Noisy(), seed=8)[0])
    # The caller's random stream is left where it was.
    assert torch.equal(torch.get_rng_state(), before)
    assert derive_seed(7, 0) != derive_seed(7, 1) != derive_seed(8, 0) and 0 <= derive_seed(1, 2) < 2**63


def test_device_batches_follow_the_given_order_and_normalise_on_the_device():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    dataset = TensorImageDataset(images, torch.arange(10), [str(i) for i in range(10)])
    batches = DeviceBatches(dataset, "cpu", batch_size=4).with_order([9, 2, 5, 0, 1, 7, 3, 8, 6, 4])
    got = list(batches)
    assert len(batches) == 2 and len(got) == 2  # the last 2 images make no full batch
    assert got[0][1].tolist() == [9, 2, 5, 0] and got[1][1].tolist() == [1, 7, 3, 8]
    assert got[0][0][:, 0, 0, 0].tolist() == [9, 2, 5, 0] and got[0][0].dtype == torch.uint8
    p = Preprocessing.for_resolution(4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    every = DeviceBatches(dataset, "cpu", batch_size=4, drop_last=False, transform=lambda x: normalize_batch(x, p))
    chunks = list(every)
    assert [c[1].tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    expected = (9 / 255 - 0.5) / 0.25
    assert chunks[2][0][1, 0, 0, 0].item() == pytest.approx(expected)


def test_load_data_reads_an_image_pack(tmp_path):
    flat = [torch.full((3, 32, 32), 40 * i, dtype=torch.uint8) for i in range(6)]
    encoded = [bytes(encode_jpeg(image, quality=95).numpy()) for image in flat]
    write_pack(
        tmp_path / "set.pack",
        name="cifar10",
        classes=["a", "b"],
        splits={"train": (encoded[:4], [0, 1, 0, 1]), "test": (encoded[4:], [1, 0])},
    )
    bundle = load_data(str(tmp_path / "set.pack"))
    assert (len(bundle.train), len(bundle.val), bundle.val_name, bundle.native_size) == (4, 2, "test", 32)
    assert bundle.train.labels.tolist() == [0, 1, 0, 1] and bundle.mean == CIFAR10_MEAN
    assert abs(int(bundle.val.images[1].float().mean()) - 200) <= 2  # JPEG keeps a flat grey within a level or two


@pytest.mark.parametrize("target", ["data folder", "folder above it"])
def test_a_class_folder_linked_to_the_data_folder_or_above_is_refused(tmp_path, target):
    """`data/cat -> /` made the scan walk the whole filesystem (a hang, in effect), and a link to the data folder or
    any folder above it reads every class again as one more class."""
    root = tmp_path / "top" / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(encode_png(torch.zeros(3, 4, 4, dtype=torch.uint8)).numpy().tobytes())
    (root / "b").symlink_to(root if target == "data folder" else tmp_path / "top", target_is_directory=True)
    with pytest.raises(MobileNetError, match=r"class folder .*b is a link to .*, which holds the data folder"):
        scan_class_folders(root)
    (root / "b").unlink()
    (root / "b").symlink_to(root / "a", target_is_directory=True)  # a link elsewhere is a class like any other
    assert list(scan_class_folders(root)) == ["a", "b"]
