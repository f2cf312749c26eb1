"""The papers' experiments as data (V1 Tables 4-7, V2 Table 4) and the budgets: checked without training."""

from __future__ import annotations

import pytest

from mobilenet.cost import count_costs
from mobilenet.errors import MobileNetError
from mobilenet.paper import V1_TABLE4, V1_TABLE5, V1_TABLE6, V1_TABLE7, V2_TABLE4
from mobilenet.reproduce_experiments import (
    BUDGETS,
    EXPERIMENT_NAMES,
    Budget,
    Experiment,
    Row,
    RunSpec,
    matched_v2_alpha,
    plan_runs,
    resolve_budget,
    select_experiments,
)
from mobilenet.spec import model_config


def test_the_papers_experiments_as_data():
    chosen = select_experiments(None)
    assert [e.name for e in chosen] == list(EXPERIMENT_NAMES[:5])
    runs = plan_runs(chosen)
    keys = [spec.key for spec in runs]
    assert len(keys) == len(set(keys)) == 11
    # V1 1.0 at 32 px is in Tables 4, 6, 7 and the V2 comparison, and is one run, trained first.
    assert keys[0] == "v1_1.0_32px"
    assert sum(row.run.key == keys[0] for e in chosen for row in e.rows) == 4
    by_name = {e.name: e for e in chosen}
    # Table 4 first; the published figures are the papers' (V1 Table 4: 71.7% / 4866M vs 70.6% / 569M).
    conv = by_name["table4"].rows[1].paper
    assert (conv.top1, conv.macs_m, conv.params_m) == (71.7, 4866, 29.3)
    assert [row.paper.top1 for row in by_name["table6"].rows] == [70.6, 68.4, 63.7, 50.6]
    assert [row.paper.top1 for row in by_name["table7"].rows] == [70.6, 69.1, 67.2, 64.4]
    assert [row.run.resolution for row in by_name["table7"].rows] == [32, 28, 24, 20]
    assert [row.paper.top1 for row in by_name["table5"].rows] == [68.4, 65.3]
    # Every published row is one of mobilenet.paper's tables (the rows themselves, not copies), and its model is the
    # one trained: table 6's widths and table 7's rows are read off the paper's model names.
    published = [*V1_TABLE4, *V1_TABLE5, *V1_TABLE6, *V1_TABLE7, *V2_TABLE4]
    assert all(any(row.paper is p for p in published) and row.paper.model for e in chosen for row in e.rows)
    assert [row.run.alpha for row in by_name["table6"].rows] == [
        model_config(row.paper.model).alpha for row in by_name["table6"].rows
    ]
    assert [row.paper for row in by_name["table7"].rows] == list(V1_TABLE7)
    # V2 at V1's cost: the cost model's closest width, not a hand-picked one.
    v1_macs = by_name["v1-vs-v2"].rows[0].run.cost().macs
    matched = by_name["v1-vs-v2"].rows[2].run
    assert matched.alpha == matched_v2_alpha(v1_macs)
    gap = abs(matched.cost().macs - v1_macs)
    for other in (matched.alpha - 0.05, matched.alpha + 0.05):
        assert abs(count_costs(matched.model, **{**matched.options(), "alpha": other}).macs - v1_macs) > gap
    assert gap < 0.05 * v1_macs
    # Every model builds at its input size with small_input, and the conv twin costs several times V1's MACs.
    assert by_name["table4"].rows[1].run.cost().macs > 8 * v1_macs
    assert select_experiments("table7, table4") == [by_name["table7"], by_name["table4"]]


def test_budgets_resolve_by_name_and_say_what_changes_the_weights():
    assert resolve_budget("quick") is BUDGETS["quick"]
    custom = Budget("custom", epochs=1, batches_per_epoch=2, batch_size=16)
    assert resolve_budget(custom) is custom
    with pytest.raises(MobileNetError, match="unknown budget 'huge'"):
        resolve_budget("huge")
    # The device, threads and latency runs do not change the trained weights; the epochs do.
    local = Budget("a", 2, 3, threads=1)
    assert local.training_fields() == Budget("b", 2, 3, device="cpu", latency_runs=1).training_fields()
    assert local.training_fields() != Budget("a", 3, 3).training_fields()
    # 100 images in batches of 16: 6 steps, capped at 3 per epoch.
    assert Budget("a", 2, 3, batch_size=16).images_per_run(100) == 2 * 3 * 16
    assert Budget("a", 2, None, batch_size=16).images_per_run(100) == 2 * 6 * 16


def test_a_run_key_naming_two_models_is_refused():
    row = select_experiments("table4")[0].rows[0]
    impostor = RunSpec(row.run.key, "other", row.run.model, 0.5, 32)
    clash = Experiment("clash", "t", "s", (row, Row(impostor, row.paper)), "c", "c")
    with pytest.raises(MobileNetError, match="names two different models"):
        plan_runs([clash])
    with pytest.raises(MobileNetError, match="unknown experiment 'table9'"):
        select_experiments("table4,table9")


def test_table8_pairs_mobilenet_with_the_full_vgg16():
    from mobilenet.paper import V1_TABLE8

    (table8,) = select_experiments("table8")
    mobilenet_row, vgg_row = table8.rows
    assert (mobilenet_row.paper, vgg_row.paper) == (V1_TABLE8[0], V1_TABLE8[2])
    assert vgg_row.run.model == "vgg16_224" and vgg_row.run.small_input is False
    # The full VGG 16 (its 4096-4096 FC layers included), at CIFAR-10's 32 px with 10 classes.
    cost = vgg_row.run.cost()
    assert cost.params == count_costs("vgg16_224", num_classes=10).params > 100_000_000
    assert [e.name for e in select_experiments("all")] == list(EXPERIMENT_NAMES)
