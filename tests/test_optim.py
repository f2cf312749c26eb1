"""Recipes, the optimizers' semantics (TF's RMSprop), weight-decay groups, learning-rate schedules and the EMA."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from mobilenet.models import create_model
from mobilenet.optim import (
    ModelEMA,
    Recipe,
    RMSpropTF,
    build_optimizer,
    lr_at,
    parameter_groups,
    resolve_recipe,
)
from mobilenet.train import TrainConfig

TINY = "mobilenet_v1_0.25_128"


def test_recipes_follow_the_papers():
    paper = resolve_recipe(TrainConfig(model=TINY, data="x", out="y", recipe="paper"), small_images=False)
    # V2 paper section 6.1: RMSProp, decay and momentum 0.9, lr 0.045 decayed 0.98/epoch, weight decay 4e-5.
    assert (paper.optimizer, paper.lr, paper.schedule, paper.weight_decay) == ("rmsprop", 0.045, "exponential", 4e-5)
    assert paper.label_smoothing == 0.0 and not paper.decay_depthwise
    modern = resolve_recipe(TrainConfig(model=TINY, data="x", out="y", batch_size=256, epochs=100), small_images=True)
    assert (modern.optimizer, modern.schedule, modern.label_smoothing) == ("sgd", "cosine", 0.1)
    assert modern.lr == pytest.approx(0.2) and modern.warmup_epochs == 5.0


def test_weight_decay_excludes_bn_bias_and_depthwise():
    model = create_model(TINY, num_classes=3)
    decay, no_decay = parameter_groups(model, 1e-4)
    decay_ids = {id(p) for p in decay["params"]}
    named = dict(model.named_parameters())
    assert id(named["features.1.depthwise.conv.weight"]) not in decay_ids  # V1 paper section 3.2
    assert id(named["features.1.pointwise.conv.weight"]) in decay_ids
    assert id(named["features.1.pointwise.bn.weight"]) not in decay_ids
    assert id(named["classifier.bias"]) not in decay_ids and id(named["classifier.weight"]) in decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    assert no_decay["weight_decay"] == 0.0
    with_dw = parameter_groups(model, 1e-4, decay_depthwise=True)[0]
    assert id(named["features.1.depthwise.conv.weight"]) in {id(p) for p in with_dw["params"]}


def test_rmsprop_tf_matches_timm():
    # Independent reference: timm's RMSpropTF (TF semantics: eps inside sqrt, ms initialised to 1, lr in momentum).
    from timm.optim import RMSpropTF as TimmRMSpropTF

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = RMSpropTF([a], lr=0.045, rho=0.9, momentum=0.9, eps=1.0, weight_decay=4e-5)
    ref = TimmRMSpropTF([b], lr=0.045, alpha=0.9, momentum=0.9, eps=1.0, weight_decay=4e-5, lr_in_momentum=True)
    for step in range(4):
        grad = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a.detach(), torch.zeros(5, 4))


def test_lr_schedules():
    recipe = Recipe("modern", "sgd", 0.1, "cosine", 1.0, 0.0, 0.0, 0.9, False)
    assert lr_at(0, recipe=recipe, steps_per_epoch=10, total_steps=100) == pytest.approx(0.01)
    assert lr_at(9, recipe=recipe, steps_per_epoch=10, total_steps=100) == pytest.approx(0.1)
    assert lr_at(10, recipe=recipe, steps_per_epoch=10, total_steps=100) == pytest.approx(0.1)
    mid = lr_at(55, recipe=recipe, steps_per_epoch=10, total_steps=100)
    assert mid == pytest.approx(0.05 * (1 + math.cos(math.pi * 45 / 90)))
    paper = Recipe("paper", "rmsprop", 0.045, "exponential", 0.0, 4e-5, 0.0, 0.9, False)
    assert lr_at(35, recipe=paper, steps_per_epoch=10, total_steps=100) == pytest.approx(0.045 * 0.98**3)


def test_ema_follows_tf_formula():
    model = torch.nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.99)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    decay = min(0.99, 2 / 11)  # TF ExponentialMovingAverage with num_updates=1
    torch.testing.assert_close(ema.module.weight, decay * start + (1 - decay) * model.weight.detach())


def test_cosine_and_step_schedules_at_hand_computed_points():
    recipe = Recipe("modern", "sgd", 0.1, "cosine", 0.0, 0.0, 0.0, 0.9, False)
    # No warmup, 100 steps: a quarter of the way, 0.5 * 0.1 * (1 + cos(pi / 4)) = 0.05 * 1.70710678.
    assert lr_at(25, recipe=recipe, steps_per_epoch=10, total_steps=100) == pytest.approx(0.0853553390593)
    assert lr_at(50, recipe=recipe, steps_per_epoch=10, total_steps=100) == pytest.approx(0.05)
    assert lr_at(100, recipe=recipe, steps_per_epoch=10, total_steps=100) == pytest.approx(0.0)
    step = Recipe("modern", "sgd", 0.1, "step", 0.0, 0.0, 0.0, 0.9, False)
    lrs = [lr_at(s, recipe=step, steps_per_epoch=10, total_steps=100) for s in (49, 50, 74, 75)]
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001])
    constant = Recipe("modern", "sgd", 0.1, "constant", 0.0, 0.0, 0.0, 0.9, False)
    assert lr_at(99, recipe=constant, steps_per_epoch=10, total_steps=100) == 0.1


def test_recipe_resolves_from_any_object_with_the_options():
    # Not only a TrainConfig: the options an experiment or a benchmark has at hand.
    options = SimpleNamespace(
        recipe="modern",
        optimizer="adamw",
        lr=None,
        schedule=None,
        warmup_epochs=None,
        weight_decay=None,
        label_smoothing=None,
        momentum=0.9,
        decay_depthwise=False,
        batch_size=256,
        epochs=20,
    )
    recipe = resolve_recipe(options, small_images=True)
    # AdamW: 1e-3 per 128 images, decoupled weight decay 0.05 (Loshchilov & Hutter 2019); warmup 5% of 20 epochs.
    assert (recipe.optimizer, recipe.weight_decay, recipe.warmup_epochs) == ("adamw", 0.05, 1.0)
    assert recipe.lr == pytest.approx(2e-3)
    assert recipe == resolve_recipe(TrainConfig(model=TINY, data="x", out="y", **vars(options)), small_images=True)


@pytest.mark.parametrize(
    ("name", "kind"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("rmsprop", RMSpropTF)]
)
def test_build_optimizer_uses_the_recipes_optimizer_and_groups(name, kind):
    model = create_model(TINY, num_classes=3)
    recipe = Recipe("modern", name, 0.05, "cosine", 0.0, 1e-4, 0.0, 0.9, False)
    optimizer = build_optimizer(model, recipe)
    assert type(optimizer) is kind
    assert [g["group"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.05 for g in optimizer.param_groups)
    if name == "sgd":
        assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_multi_tensor_update_computes_what_pytorchs_per_parameter_loop_does(name):
    # Reference: the same optimizer and groups with PyTorch's single-tensor implementation (foreach=False).
    recipe = Recipe("modern", name, 0.05, "cosine", 0.0, 1e-4, 0.0, 0.9, False)
    torch.manual_seed(0)
    ours_model = create_model(TINY, num_classes=3).train()
    reference_model = copy.deepcopy(ours_model)
    ours = build_optimizer(ours_model, recipe)
    assert ours.defaults["foreach"]
    reference_parameters = dict(zip(ours_model.parameters(), reference_model.parameters(), strict=True))
    groups = [
        {
            **{k: v for k, v in g.items() if k not in ("fused", "foreach")},
            "params": [reference_parameters[p] for p in g["params"]],
        }
        for g in ours.param_groups
    ]
    kind = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    reference = kind(groups, foreach=False, fused=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients for both (a backward pass is not bitwise repeatable across threads)
        for p in ours_model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
            reference_parameters[p].grad = p.grad.clone()
        ours.step()
        reference.step()
    for (n, p), (_, q) in zip(ours_model.named_parameters(), reference_model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
