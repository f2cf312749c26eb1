"""`mobilenet convert --from torchvision|timm FILE --model NAME --out OUT`, end to end on local files."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mobilenet.checkpoint import load, load_checkpoint, read_header
from mobilenet.cli import main
from mobilenet.convert import IMAGENET_PREPROCESSING, imagenet_classes

torchvision = pytest.importorskip("torchvision")


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-default BN statistics and affine parameters: with the default ones the logits are ~1e-9."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def _gap(ours: torch.nn.Module, theirs: torch.nn.Module, size: int, drop_first: bool = False) -> tuple[float, float]:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = ours.eval()(x), theirs.eval()(x)
    if drop_first:
        b = b[:, 1:]
    return (a - b).abs().max().item(), b.abs().max().item()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Reference models with randomised BN and their checkpoint files in the libraries' own formats."""
    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    tv = _randomize_bn(torchvision.models.mobilenet_v2(width_mult=0.5), seed=1)
    torch.save(tv.state_dict(), root / "tv_050.pth")
    tv1001 = _randomize_bn(torchvision.models.mobilenet_v2(width_mult=0.5, num_classes=1001), seed=2)
    torch.save(tv1001.state_dict(), root / "tv_050_1001.pth")
    out = {"root": root, "tv": tv, "tv1001": tv1001}
    try:
        import timm
        from safetensors.torch import save_file
    except ImportError:
        return out
    timm_v2 = _randomize_bn(timm.create_model("mobilenetv2_050", pretrained=False), seed=3)
    save_file({k: v.contiguous() for k, v in timm_v2.state_dict().items()}, str(root / "timm_v2_050.safetensors"))
    timm_v1 = _randomize_bn(timm.create_model("mobilenetv1_100", pretrained=False), seed=4)
    # As timm's train.py writes it: a wrapper dict, here also with DistributedDataParallel's "module." prefix.
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in timm_v1.state_dict().items()}}
    torch.save(wrapped, root / "timm_v1_train.pth")
    out |= {"timm_v2": timm_v2, "timm_v1": timm_v1}
    return out


def _convert(*args: str) -> int:
    return main(["convert", *map(str, args)])


def test_torchvision_pth(files, tmp_path, capsys):
    out = tmp_path / "v2.safetensors"
    assert (
        _convert("--from", "torchvision", files["root"] / "tv_050.pth", "--model", "mobilenet_v2_0.5_96", "--out", out)
        == 0
    )
    printed = capsys.readouterr().out
    assert "logit check vs torchvision.models.mobilenet_v2(width_mult=0.5" in printed and str(out) in printed
    checkpoint = load_checkpoint(out)
    gap, scale = _gap(checkpoint.model, files["tv"], 96)
    assert gap <= 1e-5 * scale
    assert checkpoint.classes == imagenet_classes()
    assert checkpoint.preprocessing == IMAGENET_PREPROCESSING
    check = checkpoint.metadata["logit_check"]
    assert check["max_abs_diff"] <= 1e-5 * check["max_abs_reference"]
    assert checkpoint.metadata["converted_from"] == "tv_050.pth"


def test_tf_style_1001_head(files, tmp_path, capsys):
    dropped, kept = tmp_path / "dropped.safetensors", tmp_path / "kept.safetensors"
    src = files["root"] / "tv_050_1001.pth"
    assert _convert("--from", "torchvision", src, "--model", "mobilenet_v2_0.5_96", "--out", dropped) == 0
    assert "background row 0 dropped" in capsys.readouterr().out
    model = load(dropped)
    assert model.config.num_classes == 1000 and model.classes == imagenet_classes()
    gap, scale = _gap(model, files["tv1001"], 96, drop_first=True)
    assert gap <= 1e-5 * scale
    assert read_header(dropped)["metadata"]["dropped_background"] is True

    # The reference check ran above; here the kept head's logits are compared directly.
    args = ("--from", "torchvision", src, "--model", "mobilenet_v2_0.5_96", "--out", kept, "--keep-background")
    assert _convert(*args, "--no-check") == 0
    model = load(kept)
    assert model.config.num_classes == 1001 and model.classes[:2] == ["background", "tench"]
    gap, scale = _gap(model, files["tv1001"], 96)
    assert gap <= 1e-5 * scale


def test_timm_safetensors_v2(files, tmp_path):
    if "timm_v2" not in files:
        pytest.skip("timm not installed")
    out = tmp_path / "v2.safetensors"
    assert (
        _convert(
            "--from", "timm", files["root"] / "timm_v2_050.safetensors", "--model", "mobilenet_v2_0.5_96", "--out", out
        )
        == 0
    )
    checkpoint = load_checkpoint(out)
    gap, scale = _gap(checkpoint.model, files["timm_v2"], 96)
    assert gap <= 1e-5 * scale
    # timm's pretrained_cfg for mobilenetv2_050: ImageNet mean/std, bicubic, crop_pct 0.875
    assert checkpoint.preprocessing["interpolation"] == "bicubic"
    assert checkpoint.preprocessing["resize_size"] == 256


def test_timm_training_checkpoint_v1(files, tmp_path):
    if "timm_v1" not in files:
        pytest.skip("timm not installed")
    out = tmp_path / "v1.safetensors"
    assert (
        _convert("--from", "timm", files["root"] / "timm_v1_train.pth", "--model", "mobilenet_v1_1.0_128", "--out", out)
        == 0
    )
    model = load(out)
    assert model.config.activation == "relu6"  # timm's V1 activation, kept by the checkpoint
    gap, scale = _gap(model, files["timm_v1"], 128)
    assert gap <= 1e-5 * scale
    assert model.preprocessing["mean"] == [0.5, 0.5, 0.5]  # timm mobilenetv1_100's default weights


def _fails(capsys, *args: str, match: str) -> str:
    code = _convert(*args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mobilenet convert: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert match in err, err
    return err


def test_bad_inputs_are_one_line_errors(files, tmp_path, capsys):
    root = files["root"]
    out = tmp_path / "out.safetensors"
    _fails(
        capsys,
        "--from",
        "torchvision",
        tmp_path / "nope.pth",
        "--model",
        "mobilenet_v2_0.5_96",
        "--out",
        out,
        match="does not exist",
    )
    err = _fails(
        capsys,
        "--from",
        "torchvision",
        root / "tv_050.pth",
        "--model",
        "mobilenet_v1_1.0_128",
        "--out",
        out,
        match="does not fit mobilenet_v1_1.0_128",
    )
    assert "missing keys" in err and "unexpected keys" in err and "mis-shaped keys" in err
    _fails(
        capsys,
        "--from",
        "torchvision",
        root / "tv_050.pth",
        "--model",
        "mobilenet_v2_1.0_96",
        "--out",
        out,
        match="mis-shaped keys",
    )
    _fails(
        capsys,
        "--from",
        "timm",
        root / "tv_050.pth",
        "--model",
        "mobilenet_v2_0.5_96",
        "--out",
        out,
        match="is --from timm right?",
    )
    _fails(
        capsys,
        "--from",
        "torchvision",
        root / "tv_050.pth",
        "--model",
        "mobilenet_v2_0.5_96",
        "--out",
        out,
        "--keep-background",
        match="applies to a 1001-class head",
    )
    _fails(
        capsys,
        "--from",
        "torchvision",
        "--model",
        "mobilenet_v2_0.5_96",
        "--out",
        out,
        match="either FILE or --download",
    )
    _fails(
        capsys,
        "--from",
        "torchvision",
        root / "tv_050.pth",
        "--model",
        "mobilenet_v9",
        "--out",
        out,
        match="unknown model 'mobilenet_v9'",
    )
    assert not out.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("check", [True, False])
def test_weights_holding_nan_or_inf_are_refused_by_name(files, tmp_path, capsys, value, check):
    """With the logit check the disagreement read 'up to nan (allowed nan)'; with --no-check the file was written
    and only refused when loaded. Both now name the tensor before anything is written."""
    state = {k: v.clone() for k, v in files["tv"].state_dict().items()}
    state["classifier.1.weight"][3, 5] = value
    source, out = tmp_path / "broken.pth", tmp_path / "out.safetensors"
    torch.save(state, source)
    extra = [] if check else ["--no-check"]
    args = ["--from", "torchvision", source, "--model", "mobilenet_v2_0.5_224", "--out", out, *extra]
    _fails(capsys, *args, match="NaN or infinite values in 1 tensor(s) (classifier.1.weight)")
    assert not out.exists()


def test_truncated_and_foreign_files(files, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    if "timm_v2" in files:
        data = (files["root"] / "timm_v2_050.safetensors").read_bytes()
        cut = tmp_path / "cut.safetensors"
        cut.write_bytes(data[: len(data) // 2])
        _fails(capsys, "--from", "timm", cut, "--model", "mobilenet_v2_0.5_96", "--out", out, match="truncated")
    data = (files["root"] / "tv_050.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    _fails(
        capsys,
        "--from",
        "torchvision",
        cut,
        "--model",
        "mobilenet_v2_0.5_96",
        "--out",
        out,
        match="truncated or corrupt",
    )

    class Payload:  # a pickle that would run code if anything unpickled it without weights_only
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, evil)
    _fails(
        capsys,
        "--from",
        "torchvision",
        evil,
        "--model",
        "mobilenet_v2_0.5_96",
        "--out",
        out,
        match="objects other than tensors",
    )
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    _fails(
        capsys,
        "--from",
        "torchvision",
        text,
        "--model",
        "mobilenet_v2_0.5_96",
        "--out",
        out,
        match="neither a PyTorch checkpoint",
    )
    assert not out.exists()


def test_own_checkpoint_is_not_converted_again(files, tmp_path, capsys):
    first = tmp_path / "ours.safetensors"
    assert (
        _convert(
            "--from",
            "torchvision",
            files["root"] / "tv_050.pth",
            "--model",
            "mobilenet_v2_0.5_96",
            "--out",
            first,
            "--no-check",
        )
        == 0
    )
    assert "skipped" in capsys.readouterr().out
    _fails(
        capsys,
        "--from",
        "torchvision",
        first,
        "--model",
        "mobilenet_v2_0.5_96",
        "--out",
        tmp_path / "x",
        match="already a mobilenet checkpoint",
    )


def test_wrong_from_exits_2_without_traceback(files, tmp_path):
    """Run the real entry point: argparse's choice error and a MobileNetError are both one line, exit code 2."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobilenet",
            "convert",
            "--from",
            "tf",
            str(files["root"] / "tv_050.pth"),
            "--model",
            "mobilenet_v2_0.5_96",
            "--out",
            str(tmp_path / "o.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid choice: 'tf'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
