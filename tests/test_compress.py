"""The low-rank classifier: truncated SVD of a trained classifier (Denton et al. 2014, section 3.2), its cost, the
checkpoint round trip, `mobilenet compress` and `mobilenet cost --fc`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_folder
from mobilenet.checkpoint import load, load_checkpoint, read_header, save
from mobilenet.cli import main
from mobilenet.compress import classifier_matrix, compress_checkpoint, factor_classifier, truncated_svd
from mobilenet.cost import count_costs, factored_fc_cost
from mobilenet.errors import MobileNetError
from mobilenet.models import create_backbone, create_model

SMALL = "mobilenet_v2_0.35_96"  # classifier 1280 -> classes


def _trained_like(name: str = SMALL, num_classes: int = 10, seed: int = 0, **overrides):
    """A model whose classifier has the spread of a trained one (not the N(0, 0.01) init), in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes, **overrides).eval()
    torch.nn.init.normal_(model.classifier.weight, 0.0, 0.3)
    torch.nn.init.normal_(model.classifier.bias, 0.0, 0.3)
    return model


def _features(model, batch: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.num_features, 3, 3, generator=generator)


# --------------------------------------------------------------------------------------------------------------
# The factorisation
# --------------------------------------------------------------------------------------------------------------


def test_full_rank_gives_the_same_logits():
    model = _trained_like(num_classes=10)
    factored = factor_classifier(model, 10)  # min(1280, 10)
    assert factored.config.classifier_rank == 10
    assert [tuple(layer.weight.shape) for layer in factored.classifier] == [(10, 1280), (10, 10)]
    with torch.no_grad():
        features = _features(model)
        expected, got = model.forward_head(features), factored.forward_head(features)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
        images = torch.randn(2, 3, 96, 96)
        expected, got = model(images), factored(images)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_truncation_is_the_best_rank_r_approximation_with_sqrt_s_in_each_factor():
    model = _trained_like(num_classes=40)
    weight, _ = classifier_matrix(model)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    first, second, singular = truncated_svd(weight, 8)
    assert torch.allclose(singular, s)
    best = (u[:, :8] * s[:8]) @ vh[:8]  # Eckart-Young: U_r S_r V_r^T
    assert torch.allclose((second.double() @ first.double()), best, atol=1e-5)
    # The singular values are split evenly: row i of the first factor and column i of the second have norm sqrt(s_i).
    root = s[:8].sqrt().float()
    assert torch.allclose(first.norm(dim=1), root, rtol=1e-4)
    assert torch.allclose(second.norm(dim=0), root, rtol=1e-4)


def test_factored_model_uses_the_truncated_weights_and_leaves_the_original_alone():
    model = _trained_like(num_classes=40)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    factored = factor_classifier(model, 5)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    weight, bias = classifier_matrix(model)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    with torch.no_grad():
        features = _features(model)
        pooled = torch.flatten(model.pool(features), 1)
        expected = pooled.double() @ ((u[:, :5] * s[:5]) @ vh[:5]).T + bias.double()
        assert torch.allclose(factored.forward_head(features).double(), expected, atol=1e-4)
        # The body is shared, unchanged.
        assert torch.equal(factored.features[3].depthwise.conv.weight, model.features[3].depthwise.conv.weight)
    # Factoring a factored classifier again works on the product of its two layers.
    again = factor_classifier(factored, 5)
    with torch.no_grad():
        assert torch.allclose(again.forward_head(features), factored.forward_head(features), atol=1e-5)


def test_cost_model_counts_the_factored_head():
    full = count_costs("mobilenet_v1_1.0_224")
    factored = count_costs("mobilenet_v1_1.0_224", classifier_rank=100)
    assert full.params - factored.params == 1024 * 1000 - 100 * (1024 + 1000)
    assert [row.name for row in factored.rows[-2:]] == ["classifier.0", "classifier.1"]
    assert factored.rows[-2].bias_params == 0 and factored.rows[-1].bias_params == 1000
    model = create_model("mobilenet_v1_1.0_224", classifier_rank=100)
    assert count_costs(model).trainable_params == sum(p.numel() for p in model.parameters())


def test_fc_example_of_the_issue():
    cost = factored_fc_cost(4096, 4096, 512)
    assert (cost.params_full, cost.params_factored) == (16_777_216, 4_194_304)
    assert (cost.macs_full, cost.macs_factored) == (16_777_216, 4_194_304) and cost.ratio == 0.25


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_the_rank(tmp_path):
    factored = factor_classifier(_trained_like(num_classes=10), 4)
    path = save(factored, tmp_path / "f.safetensors", classes=[str(i) for i in range(10)])
    assert read_header(path)["config"]["classifier_rank"] == 4
    loaded = load_checkpoint(path)
    assert loaded.config == factored.config and loaded.model.config.classifier_rank == 4
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), factored(images))
    assert count_costs(loaded.model).params == count_costs(factored).params
    # An unfactored model's header has no classifier_rank key: its checkpoints read as before.
    plain = save(_trained_like(num_classes=10), tmp_path / "p.safetensors")
    assert "classifier_rank" not in read_header(plain)["config"]


def test_compress_checkpoint_without_data(tmp_path):
    model = _trained_like(num_classes=10)
    source = save(model, tmp_path / "in.safetensors", classes=[f"c{i}" for i in range(10)])
    report = compress_checkpoint(source, 3, tmp_path / "out.safetensors")
    assert report.factorisation.rank == 3 and report.factorisation.full_rank == 10
    assert 0 < report.factorisation.energy_kept < 1
    assert report.params_before - report.params_after == 1280 * 10 - 3 * (1280 + 10)
    out = load_checkpoint(tmp_path / "out.safetensors")
    assert out.classes == [f"c{i}" for i in range(10)] and out.config.classifier_rank == 3
    assert out.metadata["compression"]["factorisation"]["rank"] == 3


def test_cli_compress_with_fine_tuning(tmp_path, capsys):
    data = tiny_folder(tmp_path / "data")
    model = _trained_like("mobilenet_v1_0.25_128", num_classes=3, resolution=32, small_input=True)
    source = save(model, tmp_path / "in.safetensors", classes=["a", "b", "c"])
    out = tmp_path / "out.safetensors"
    argv = ["compress", str(source), "--classifier-rank", "2", "--out", str(out), "--data", str(data)]
    code = main([*argv, "--fine-tune-epochs", "1", "--batch-size", "6", "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(report["top1"]) == {"original", "factored", "fine_tuned"}
    assert len(report["fine_tune"]) == 1 and 0.0 <= report["fine_tune"][0]["val_top1"] <= 1.0
    tuned = load(out)
    assert tuned.config.classifier_rank == 2 and tuned.classes == ["a", "b", "c"]
    # Fine-tuning moved the factored weights away from the plain truncation.
    plain = factor_classifier(model, 2)
    assert not torch.equal(tuned.classifier[0].weight, plain.classifier[0].weight)
    # Every command reads the result: eval on the same data.
    assert main(["eval", str(out), "--data", str(data)]) == 0


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear MobileNetError, exit 2 on the command line
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "message"),
    [(0, "integer >= 1"), (-3, "integer >= 1"), (11, r"exceeds the full rank .*min\(in, out\) = 10"), (2.5, ">= 1")],
)
def test_bad_rank_is_named(rank, message):
    model = _trained_like(num_classes=10)
    with pytest.raises(MobileNetError, match=message):
        factor_classifier(model, rank)
    with pytest.raises(MobileNetError, match="classifier_rank"):
        create_model(SMALL, num_classes=10, classifier_rank=rank)


def test_model_without_a_classifier_is_refused():
    with pytest.raises(MobileNetError, match="no classifier to factor"):
        factor_classifier(create_backbone(SMALL), 2)
    with pytest.raises(MobileNetError, match="no classifier to factor"):
        factor_classifier(torch.nn.Linear(4, 4), 2)


def test_checkpoint_without_a_classifier_is_refused(tmp_path):
    path = save(_trained_like(num_classes=10), tmp_path / "c.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {key: value for key, value in load_file(str(path)).items() if not key.startswith("classifier.")}
    header = json.loads(metadata["mobilenet"])
    header.pop("weights_sha256")
    save_file(tensors, str(tmp_path / "headless.safetensors"), metadata={"mobilenet": json.dumps(header)})
    with pytest.raises(MobileNetError, match=r"missing keys .*classifier\.weight"):
        compress_checkpoint(tmp_path / "headless.safetensors", 2, tmp_path / "out.safetensors")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--classifier-rank", "0"], "integer >= 1"),
        (["--classifier-rank", "11"], "exceeds the full rank"),
        (["--classifier-rank", "2", "--fine-tune-epochs", "1"], "needs --data"),
        (["--classifier-rank", "2", "--fine-tune-epochs", "-1"], "integer >= 0"),
    ],
)
def test_cli_compress_bad_input_exits_2(tmp_path, capsys, extra, expected):
    source = save(_trained_like(num_classes=10), tmp_path / "in.safetensors")
    code = main(["compress", str(source), "--out", str(tmp_path / "out.safetensors"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mobilenet compress: error:") and expected in err
    assert err.count("\n") == 1 and not (tmp_path / "out.safetensors").exists()


def test_cli_compress_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a checkpoint")
    code = main(["compress", str(bogus), "--classifier-rank", "2", "--out", str(tmp_path / "o.safetensors")])
    assert code == 2 and str(bogus) in capsys.readouterr().err
