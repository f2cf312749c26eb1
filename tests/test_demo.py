"""The demo end to end at one epoch: both twins train, costs come from the cost model, the plot is written."""

from __future__ import annotations

from mobilenet.cost import count_costs
from mobilenet.demo import CONV_TWIN, SEPARABLE, DemoConfig, run_demo
from mobilenet.spec import network_for


def test_demo_runs_and_reports_table4_shape(tmp_path):
    rows = run_demo(
        DemoConfig(out=str(tmp_path / "demo"), epochs=1, latency_runs=2, latency_batch=4), progress=False, log=None
    )
    separable, conv = rows
    assert (separable["model"], conv["model"]) == (SEPARABLE, CONV_TWIN)
    # The cost figures are the analytic cost model's for the same configuration (alpha 0.25, 32 px, 10 classes).
    expected = count_costs(network_for(SEPARABLE, alpha=0.25, resolution=32, num_classes=10))
    assert separable["macs"] == expected.macs and separable["params"] == expected.params
    # V1 paper Table 4: the standard-conv twin costs several times more (8.6x multiply-adds at alpha 1, 224 px).
    assert conv["macs"] > 5 * separable["macs"] and conv["params"] > 5 * separable["params"]
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["latency_ms"] > 0 for row in rows)
    assert (tmp_path / "demo" / "table4_digits.png").stat().st_size > 1000
