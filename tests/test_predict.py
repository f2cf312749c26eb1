"""Predict: decoding every kind of image a user has, preprocessing exactly as evaluation does, top-k, backends,
bad files reported without stopping the others, and the CLI's exit codes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenet.backends import RandomWeightsWarning
from mobilenet.cli import main
from mobilenet.data import build_eval_transform
from mobilenet.errors import MobileNetError
from mobilenet.images import BadImageError, decode_image
from mobilenet.models import create_model
from mobilenet.predict import Predictor

PREPROCESSING = {
    "input_size": 32,
    "resize_size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "interpolation": "bilinear",
    "style": "small",
}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(rgb, tmp_path_factory) -> dict[str, object]:
    """One file per kind a user throws at predict, written with PIL."""
    root = tmp_path_factory.mktemp("images")
    img = Image.fromarray(rgb)
    gray16 = (rgb[..., 0].astype(np.uint16) * 257 + 3).clip(0, 65535)  # spans the full 16-bit range
    files = {
        "jpeg": (img, "a.jpg", {}),
        "png": (img, "b.png", {}),
        "webp": (img, "c.webp", {"lossless": True}),
        "gray": (img.convert("L"), "d.png", {}),
        "rgba": (img.convert("RGBA"), "e.png", {}),
        "cmyk": (img.convert("CMYK"), "f.jpg", {"quality": 95}),
        "palette": (img.convert("P"), "g.png", {}),
        "16bit": (Image.fromarray(gray16.astype(np.uint16)), "h.png", {}),
        "bmp": (img, "i.bmp", {}),
        "tiff": (img, "j.tiff", {}),
    }
    paths = {}
    for kind, (image, name, options) in files.items():
        image.save(root / name, **options)
        paths[kind] = root / name
    paths["gray16_values"] = gray16
    return paths


def test_decode_every_kind(images, rgb):
    for kind in ("jpeg", "png", "webp", "gray", "rgba", "cmyk", "palette", "16bit", "bmp", "tiff"):
        tensor = decode_image(images[kind])
        assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 24, 40), kind
    hwc = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
    # Lossless formats decode to the exact pixels; grayscale to three equal channels.
    for kind in ("png", "webp", "rgba", "bmp", "tiff"):
        np.testing.assert_array_equal(hwc(decode_image(images[kind])), rgb, err_msg=kind)
    gray = np.asarray(Image.open(images["gray"]))
    np.testing.assert_array_equal(hwc(decode_image(images["gray"])), np.repeat(gray[..., None], 3, axis=2))
    palette = np.asarray(Image.open(images["palette"]).convert("RGB"))
    np.testing.assert_array_equal(hwc(decode_image(images["palette"])), palette)
    # 16-bit: scaled (v * 255 / 65535), not clipped at 255 as PIL's convert("RGB") would.
    expected16 = np.round(images["gray16_values"] * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(images["16bit"])[0].numpy(), expected16)
    # CMYK JPEG: lossy, but close to the source colours.
    assert np.abs(hwc(decode_image(images["cmyk"])).astype(int) - rgb.astype(int)).mean() < 12


def test_decode_in_memory_inputs(rgb):
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    for value in (Image.fromarray(rgb), rgb, chw, rgb.astype(np.float32) / 255.0):
        np.testing.assert_array_equal(decode_image(value).numpy(), chw.numpy())


def test_decode_bad_inputs(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, reason in ((text, "not an image"), (empty, "empty"), (tmp_path / "nope.png", "does not exist")):
        with pytest.raises(BadImageError, match=reason) as info:
            decode_image(path)
        assert str(path) in str(info.value)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = create_model("mobilenet_v1_0.25_128", resolution=32, small_input=True, num_classes=10).eval()
    torch.nn.init.normal_(model.classifier.weight, 0.0, 0.5)  # spread the probabilities
    return model


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    from mobilenet.checkpoint import save

    return save(model, tmp_path_factory.mktemp("ckpt") / "m.safetensors", classes=CLASSES, preprocessing=PREPROCESSING)


def test_predictor_preprocesses_exactly_as_evaluation(checkpoint, model, images):
    predictor = Predictor(checkpoint)
    assert predictor.classes == CLASSES and predictor.preprocessing == PREPROCESSING
    transform = build_eval_transform(PREPROCESSING)
    for kind in ("jpeg", "png"):
        # The evaluation pipeline: mobilenet.data's decoder and eval transform.
        expected = transform(decode_image(images[kind]))
        torch.testing.assert_close(predictor.preprocess(images[kind]), expected, atol=0, rtol=0)
    (prediction,) = predictor.predict(images["png"], topk=10)
    with torch.no_grad():
        probabilities = torch.softmax(model(transform(decode_image(images["png"]))[None]).double(), 1)[0]
    assert prediction.indices[0] == int(probabilities.argmax())
    assert prediction.label == CLASSES[prediction.indices[0]]
    np.testing.assert_allclose(prediction.probabilities, probabilities.sort(descending=True).values, atol=1e-6)
    assert abs(sum(prediction.probabilities) - 1.0) < 1e-6


def test_predict_reports_bad_files_and_continues(checkpoint, images, tmp_path, rgb):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG signature and nothing else
    inputs = [images["jpeg"], bad, Image.fromarray(rgb), images["cmyk"]]
    results = Predictor(checkpoint, batch_size=2).predict(inputs, topk=3)
    assert [r.ok for r in results] == [True, False, True, True]
    assert str(bad) in results[1].error and results[1].indices == []
    assert all(
        len(r.indices) == 3 and r.probabilities == sorted(r.probabilities, reverse=True) for r in results if r.ok
    )
    assert results[2].source == "<image 2>"


def test_onnxruntime_backend_matches_torch(checkpoint, images):
    pytest.importorskip("onnxruntime")
    files = [images["jpeg"], images["palette"], images["tiff"]]
    torch_results = Predictor(checkpoint, backend="torch").predict(files, topk=3)
    ort_results = Predictor(checkpoint, backend="onnxruntime", num_threads=1).predict(files, topk=3)
    for a, b in zip(torch_results, ort_results, strict=True):
        assert a.indices == b.indices
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_predictor_argument_errors(checkpoint, tmp_path):
    with pytest.raises(MobileNetError, match="unknown backend"):
        Predictor(checkpoint, backend="tensorrt")
    with pytest.raises(MobileNetError, match="did you mean"):
        Predictor("mobilenet_v2_1.0_23")
    with pytest.raises(MobileNetError, match="does not exist"):
        Predictor(tmp_path / "missing.safetensors")
    with pytest.warns(RandomWeightsWarning, match="random"):
        Predictor("mobilenet_v1_0.25_128")


def test_cli_predict(checkpoint, images, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for kind in ("jpeg", "rgba", "16bit"):
        (folder / images[kind].name).write_bytes(images[kind].read_bytes())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    code = main(["predict", str(checkpoint), str(folder), "--format", "json", "--topk", "2", "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 1  # some failed
    records = json.loads(captured.out)
    assert len(records) == 4
    assert sum(r["error"] is None for r in records) == 3
    assert all(len(r["topk"]) == 2 and r["topk"][0]["label"] in CLASSES for r in records if r["error"] is None)
    assert "corrupt.jpg" in captured.err

    assert main(["predict", str(checkpoint), str(images["png"])]) == 0
    assert "probability" in capsys.readouterr().out


def test_cli_predict_errors(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(checkpoint), str(empty)], "no image files"),
        ([str(checkpoint), str(tmp_path / "missing.jpg")], "does not exist"),
        ([str(tmp_path / "none.safetensors"), str(empty)], "no image files"),
        (["mobilenet_v9", str(checkpoint)], "unknown model"),
    ]
    notimage = tmp_path / "model.safetensors"
    notimage.write_text("hello")
    cases.append(([str(notimage), str(checkpoint)], "not a safetensors"))
    for argv, message in cases:
        assert main(["predict", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mobilenet predict: error:") and message in err and "\n" not in err, err


def test_cli_backend_choices_are_the_backend_table():
    from mobilenet.backends import BACKENDS
    from mobilenet.cli.predict_cmd import PREDICT_BACKENDS

    assert ("auto", *BACKENDS) == PREDICT_BACKENDS


def test_top_classes_equal_torchs_softmax_and_topk():
    from mobilenet.predict import top_classes

    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(3)) * 8
    logits[2, [10, 20]] = 50.0  # a tie: the lower index comes first
    indices, probabilities = top_classes(logits, 5)
    reference = torch.softmax(logits.double(), dim=1).topk(5, dim=1)  # the independent reference
    assert indices.shape == probabilities.shape == (6, 5)
    assert indices[2, :2].tolist() == [10, 20]
    assert (indices[[0, 1, 3, 4, 5]] == reference.indices.numpy()[[0, 1, 3, 4, 5]]).all()
    assert abs(probabilities - reference.values.numpy()).max() < 1e-12
    huge = torch.full((1, 4), 1e30)  # no overflow: max-subtracted
    assert top_classes(huge, 4)[1].tolist() == [[0.25] * 4]


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda p: p.logits([[0.0]]), "got a list"),
        (lambda p: p.logits(np.zeros((1, 3, 32, 32), np.float32)), "got a ndarray"),
        (lambda p: p.logits(torch.zeros(3, 32, 32)), "got (3, 32, 32)"),
        (lambda p: p.logits(torch.zeros(1, 4, 32, 32)), "got (1, 4, 32, 32)"),
        (lambda p: p.logits(torch.zeros(1, 3, 0, 32)), "got (1, 3, 0, 32)"),
        (lambda p: p.logits(torch.zeros(1, 3, 32, 32, dtype=torch.int64)), "float batch, got torch.int64"),
        (lambda p: p.logits(torch.zeros(1, 3, 32, 32, device="meta")), "on meta"),
        (lambda p: p.predict(None), "cannot predict NoneType"),
        (lambda p: p.predict(5), "cannot predict int"),
    ],
)
def test_predictor_refuses_what_is_not_a_batch_or_images(checkpoint, call, words):
    """These were torch's or Python's tracebacks (scalar type Long, 4 channels for groups=1, 'int' object is not
    iterable)."""
    with pytest.raises(MobileNetError, match=re.escape(words)) as error:
        call(Predictor(checkpoint, backend="torch"))
    assert "expected" in str(error.value)


def test_predictor_logits_take_any_float_dtype_and_layout(checkpoint, model):
    predictor = Predictor(checkpoint, backend="torch")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    for batch in (
        x.double(),  # was "expected scalar type Double but found Float"
        x.to(memory_format=torch.channels_last),
        torch.stack([x, x], dim=4)[..., 0],  # not contiguous
        x.clone().requires_grad_(True),
    ):
        torch.testing.assert_close(predictor.logits(batch), expected)
    assert predictor.logits(x[:0]).shape == (0, 10)


def test_onnxruntime_predictor_names_its_input_size(checkpoint):
    pytest.importorskip("onnxruntime")
    predictor = Predictor(checkpoint, backend="onnxruntime", num_threads=1)
    with pytest.raises(MobileNetError, match="runs 32x32 images, got \\(1, 3, 40, 40\\)"):
        predictor.logits(torch.zeros(1, 3, 40, 40))  # was ONNX Runtime's InvalidArgument traceback
    assert predictor.logits(torch.zeros(0, 3, 32, 32)).shape == (0, 10)


def test_predictor_refuses_odd_backend_device_and_tensor_images(checkpoint):
    with pytest.raises(MobileNetError, match="unknown backend"):
        Predictor(checkpoint, backend=["torch"])  # was "unhashable type: 'list'"
    with pytest.raises(MobileNetError, match="--device must be"):
        Predictor(checkpoint, device="cpu:5")  # was "could not be read as safetensors (device cpu:5 is invalid)"
    for tensor in (torch.zeros(3, 8, 8, device="meta"), torch.zeros(3, 8, 8, dtype=torch.complex64)):
        with pytest.raises(BadImageError, match="expected real pixels"):
            decode_image(tensor)  # meta: NotImplementedError; complex: imaginary parts dropped silently
