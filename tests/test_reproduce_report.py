"""The reproduction's report: the paper's direction against ours (agrees / tie / disagrees), and what the report
files hold for runs not trained yet."""

from __future__ import annotations

import json

import pytest

from mobilenet.paper import PaperRow
from mobilenet.reproduce_experiments import Budget, Experiment, Row, RunSpec
from mobilenet.reproduce_report import NOISE_POINTS, direction, write_report

A = RunSpec("a_v1_0.25_32px", "V1 0.25", "mobilenet_v1_1.0_224", 0.25, 32)
B = RunSpec("b_v1_0.25_24px", "V1 0.25 @24", "mobilenet_v1_1.0_224", 0.25, 24)
# The paper: B is 2 points worse than A for 0.6x the multiply-adds.
ONE = Experiment(
    "one",
    "resolution",
    "test",
    (Row(A, PaperRow("p-a", 70.0, 100, 1.0)), Row(B, PaperRow("p-b", 68.0, 60, 1.0))),
    "smaller inputs lose accuracy",
    "tiny budget",
    series=True,
)


@pytest.mark.parametrize(
    ("top1_a", "top1_b", "verdict"),
    [(0.80, 0.70, "agrees"), (0.80, 0.80 - NOISE_POINTS / 200, "tie"), (0.70, 0.80, "disagrees")],
)
def test_direction_compares_the_sign_of_the_top1_difference(top1_a, top1_b, verdict):
    finished = {A.key: {"test_top1": top1_a}, B.key: {"test_top1": top1_b}}
    comparison = direction(ONE, ONE.rows[1], finished)
    assert comparison["verdict"] == verdict
    assert comparison["paper_delta_points"] == -2.0 and comparison["paper_macs_ratio"] == 0.6
    assert comparison["macs_ratio"] == round(B.cost().macs / A.cost().macs, 3) < 1
    assert comparison["delta_points"] == round(100 * (top1_b - top1_a), 2)
    assert comparison["text"].startswith("V1 0.25 @24 vs V1 0.25: paper: -2.0 points for 0.60x MACs; here:")


def test_direction_of_a_run_not_trained_yet_is_pending():
    comparison = direction(ONE, ONE.rows[1], {A.key: {"test_top1": 0.5}})
    assert comparison["verdict"] == "pending" and comparison["delta_points"] is None
    assert comparison["text"].endswith("here: not trained yet")


def test_report_of_pending_runs_lists_their_cost_and_the_papers_rows(tmp_path):
    document, files = write_report(tmp_path, [ONE], Budget("smoke", 1, 2, batch_size=16), {})
    assert json.loads(files["json"].read_text()) == document
    assert document["finished"] == 0 and document["total"] == 2
    record = document["models"][B.key]
    assert record["status"] == "pending" and record["test_top1"] is None
    assert (record["macs"], record["params"]) == (B.cost().macs, B.cost().params)
    # The published row as the report states it: the paper's four figures (which model we cost it as is not one).
    assert document["experiments"][0]["rows"][1]["paper"] == {
        "label": "p-b",
        "top1": 68.0,
        "macs_m": 60,
        "params_m": 1.0,
    }
    hardware = document["hardware"]
    assert {"cpu", "cpu_cores", "torch", "torch_threads", "gpu", "platform", "simd", "logical_cpus"} <= set(hardware)
    assert hardware["torch_threads"] >= 1
    markdown = files["markdown"].read_text()
    assert "**0 of 2 models finished.** Pending: `a_v1_0.25_32px`, `b_v1_0.25_24px`." in markdown
    assert "| V1 0.25 @24 | 24 px |" in markdown and "not trained yet" in markdown
    for name in ("accuracy_vs_macs", "accuracy_vs_params", "macs_by_operator"):
        assert files[name].read_bytes().startswith(b"\x89PNG"), name
