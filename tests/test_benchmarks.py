"""The scripts of benchmarks/ that measure the papers' claims (imported from their files, as ``python
benchmarks/NAME.py`` runs them): their figures agree with each other and with the cost model. No timed assertions."""

from __future__ import annotations

import importlib.util
import math
from types import ModuleType

from conftest import PROJECT_ROOT
from mobilenet.cost import count_costs


def load_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (its ``main`` does not run: the scripts guard it with __main__)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", PROJECT_ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_separable_layers_follow_v1_table1():
    script = load_script("separable_layers")
    pairs = script.v1_table1_separable_layers()
    # V1 paper Table 1: 13 depthwise separable layers, from 112x112x32 -> 64 to 7x7x1024 -> 1024.
    assert len(pairs) == 13
    assert pairs[0] == {"size": 112, "in_channels": 32, "out_channels": 64, "stride": 1}
    assert pairs[-1] == {"size": 7, "in_channels": 1024, "out_channels": 1024, "stride": 1}
    result = script.separable_layers(resolution=32, rounds=1, warmup=0, threads=1)
    assert len(result["rows"]) == 9  # the five 14x14x512 layers (here 2x2) are one distinct shape
    for row in result["rows"]:
        n = row["out_channels"]
        # The MAC ratio of equations (1) and (3) is exactly the paper's 1 / (1/N + 1/Dk^2).
        assert math.isclose(row["mac_ratio_speedup"], 1 / (1 / n + 1 / 9), rel_tol=1e-12)
        assert math.isclose(row["theoretical_speedup"], row["mac_ratio_speedup"], rel_tol=1e-12)
        assert row["measured_speedup"] > 0 and 0 < row["depthwise_mac_share"] < 1


def test_scaling_rows_follow_the_cost_model():
    result = load_script("scaling").scaling(
        "mobilenet_v2_1.0_224",
        alphas=(0.35, 0.5),
        resolutions=(32,),
        backends=("eager",),
        rounds=1,
        warmup=0,
        threads=1,
    )
    assert [(r["alpha"], r["resolution"], r["backend"]) for r in result["rows"]] == [
        (0.35, 32, "eager"),
        (0.5, 32, "eager"),
    ]
    for row in result["rows"]:
        assert row["macs"] == count_costs("mobilenet_v2_1.0_224", alpha=row["alpha"], resolution=32).macs
        assert math.isclose(row["gflops"], 2 * row["macs"] / (row["latency_ms"] / 1e3) / 1e9, rel_tol=1e-9)
    assert result["rows"][0]["macs"] < result["rows"][1]["macs"]
    assert result["threads"] == 1 and result["machine"]["threads"] == 1 and result["gemm_peak_gflops"] > 0
