"""Checkpoints written before the structure change still load, with the same logits.

``tests/data/v1_relu6_written_by_0976721.safetensors`` was written by ``mobilenet.weights.save`` at commit 0976721
(a V1 0.25 model switched to ReLU6 with ``use_relu6``, as timm weights were, so its header carries the old
top-level ``"activation": "relu6"``); the logits beside it were computed by that code on a seeded input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mobilenet.checkpoint import load_checkpoint, read_header, save

DATA = Path(__file__).parent / "data"
OLD = DATA / "v1_relu6_written_by_0976721.safetensors"


def _input() -> tuple[torch.Tensor, torch.Tensor]:
    expected = json.loads((DATA / "v1_relu6_written_by_0976721.logits.json").read_text())
    x = torch.randn(*expected["shape"], generator=torch.Generator().manual_seed(expected["seed"]))
    return x, torch.tensor(expected["logits"])


def test_old_checkpoint_loads_with_the_same_logits_and_metadata():
    assert "activation" not in read_header(OLD)["config"]  # the old layout: activation beside the config
    checkpoint = load_checkpoint(OLD)
    assert checkpoint.config.activation == "relu6"
    assert checkpoint.classes == ["cat", "dog", "bird"]
    assert checkpoint.preprocessing["style"] == "small"
    assert checkpoint.metadata["note"].startswith("written by mobilenet at commit 0976721")
    x, expected = _input()
    with torch.no_grad():
        got = checkpoint.model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_old_checkpoint_saved_again_keeps_its_activation_in_the_config(tmp_path):
    model = load_checkpoint(OLD).model
    path = save(model, tmp_path / "again.safetensors")
    assert read_header(path)["config"]["activation"] == "relu6"
    x, expected = _input()
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(path).model(x), expected, rtol=0, atol=1e-4)
