"""``mobilenet cost``: formats, the one-layer comparison, the papers' tables, errors, and no torch import."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT
from mobilenet.cli import main
from mobilenet.cost import count_costs


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["cost", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_has_the_issue_fields(capsys):
    code, out, _ = run_cli(capsys, "mobilenet_v1_1.0_224", "--format", "json")
    data = json.loads(out)
    assert code == 0
    assert abs(data["macs"] - 569e6) <= 1e6 and data["params"] == 4_209_088
    assert data["trainable_params"] == 4_231_976  # + 1000 FC bias + 2 x 10,944 BN channels
    assert all({"name", "op", "macs", "params"} <= set(layer) for layer in data["layers"])
    assert sum(layer["macs"] for layer in data["layers"]) == data["macs"]


def test_overrides_reach_the_table(capsys):
    code, out, _ = run_cli(capsys, "mobilenet_v2_1.0_224", "--alpha", "0.5", "--resolution", "160", "--format", "json")
    assert code == 0
    assert json.loads(out)["macs"] == count_costs("mobilenet_v2_1.0_224", alpha=0.5, resolution=160).macs


def test_csv_and_markdown(capsys):
    _, out, _ = run_cli(capsys, "mobilenet_v1_0.25_128", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[-1]["name"] == "total" and int(rows[-1]["macs"]) == count_costs("mobilenet_v1_0.25_128").macs
    assert rows[0]["in_shape"] == "128x128x3" and rows[0]["out_shape"] == "64x64x8"
    _, out, _ = run_cli(capsys, "mobilenet_v1_0.25_128", "--format", "markdown")
    assert out.startswith("### mobilenet_v1_0.25_128") and "| Conv DW 3x3 |" in out


def test_rich_table_lists_layers_totals_and_convention(capsys):
    code, out, _ = run_cli(capsys, "mobilenet_v1_1.0_224")
    assert code == 0
    assert "features.13.pointwise.conv" in out and "7x7x1024" in out
    assert "568,740,352" in out and "4,209,088" in out and "2 FLOPs" in out
    assert "94.86%" in out  # the Table 2 breakdown


def test_layer_comparison(capsys):
    code, out, _ = run_cli(capsys, "--layer", "416x416x50", "--out", "10", "--kernel", "3", "--format", "json")
    data = json.loads(out)
    assert code == 0 and round(data["macs_ratio"], 3) == 0.211
    code, out, _ = run_cli(capsys, "--layer", "3x3x3", "--out", "3", "--format", "json")
    data = json.loads(out)
    assert (data["standard"]["params"], data["separable"]["params"]) == (81, 36)
    code, out, _ = run_cli(capsys, "--layer", "416x416x50", "--out", "10")
    assert code == 0 and "0.2111" in out and "1/10 + 1/9" in out


def test_paper_formats(capsys):
    code, out, _ = run_cli(capsys, "--paper", "--format", "json")
    data = json.loads(out)
    assert code == 0 and "2 FLOPs" in data["convention"]
    keys = [table["key"] for table in data["tables"]]
    assert keys[:7] == [f"v1-table{index}" for index in range(1, 8)]
    table4 = next(table for table in data["tables"] if table["key"] == "v1-table4")
    row = next(row for row in table4["rows"] if row["item"] == "MobileNet" and row["quantity"] == "Mult-Adds (M)")
    assert row["published"] == 569 and row["status"] == "match"
    code, out, _ = run_cli(capsys, "--paper", "--format", "markdown")
    assert "### V1 Table 6: width multiplier (224)" in out and "| published | ours | difference |" in out
    code, out, _ = run_cli(capsys, "--paper")
    assert code == 0 and "V2 headline figures" in out and "published figures match" in out


def test_output_file(capsys, tmp_path):
    target = tmp_path / "cost.md"
    code, out, err = run_cli(capsys, "--paper", "--format", "markdown", "--output", str(target))
    assert code == 0 and out == "" and str(target) in err
    assert target.read_text().count("### ") >= 10


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["mobilenet_v1_1.0_224", "--alpha", "0"], "alpha"),
        (["mobilenet_v1_1.0_224", "--alpha", "nan"], "finite number > 0"),
        (["mobilenet_v1_1.0_224", "--alpha", "inf"], "finite number > 0"),
        (["mobilenet_v1_1.0_224", "--resolution", "16"], "resolution must be an integer >= 32"),
        (["mobilenet_v1_1.0_224", "--num-classes", "-1"], "num_classes must be an integer >= 1"),
        (["mobilenet_v9"], "unknown model"),
        (["--layer", "416x416", "--out", "10"], "HEIGHTxWIDTHxCHANNELS"),
        (["--layer", "416x416x50"], "--out"),
        (["--layer", "4x4x5", "--out", "0"], "output channels"),
        ([], "exactly one of"),
        (["mobilenet_v1_1.0_224", "--paper"], "exactly one of"),
        (["--paper", "--alpha", "0.5"], "apply to a model NAME"),
        (["mobilenet_v1_1.0_224", "--kernel", "5"], "give --layer too"),
        (["--layer", "8x8x4", "--out", "4", "--stride", "0"], "stride must be an integer >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, expected):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("mobilenet cost: error:") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_subprocess_does_not_import_torch_and_fails_cleanly():
    probe = (
        "import sys; from mobilenet.cli import main; code = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)"
    )
    for argv, code in ((["cost", "mobilenet_v2_1.0_224", "--format", "json"], 0), (["cost", "--paper"], 0)):
        result = subprocess.run(
            [sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60
        )
        assert result.returncode == code, result.stderr
    # The installed entry point: a malformed value is exit 2, one line, no traceback.
    result = subprocess.run(
        [sys.executable, "-m", "mobilenet", "cost", "mobilenet_v1_1.0_224", "--resolution", "abc"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--resolution" in result.stderr


def test_vgg16_table8(capsys):
    code, out, _ = run_cli(capsys, "vgg16_224")
    assert code == 0
    assert "15,470,264,320" in out and "138,344,128" in out and "15,346,630,656" in out  # total, weights, convs
    assert "Max Pool 2x2" in out


def test_fc_factorisation_example(capsys):
    code, out, _ = run_cli(capsys, "--fc", "4096x4096", "--rank", "512")
    assert code == 0 and "16,777,216" in out and "4,194,304" in out and "0.2500" in out
    code, out, _ = run_cli(capsys, "--fc", "4096x4096", "--rank", "512", "--format", "json")
    data = json.loads(out)
    assert (data["params_full"], data["params_factored"]) == (16_777_216, 4_194_304)
    assert (data["macs_full"], data["macs_factored"], data["ratio"]) == (16_777_216, 4_194_304, 0.25)


def test_classifier_rank_reaches_the_table(capsys):
    code, out, _ = run_cli(capsys, "mobilenet_v1_1.0_224", "--classifier-rank", "100", "--format", "json")
    assert code == 0
    assert json.loads(out)["params"] == 4_209_088 - 1024 * 1000 + 100 * (1024 + 1000)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--fc", "4096x", "--rank", "5"], "--fc must be INxOUT"),
        (["--fc", "0x10", "--rank", "1"], "--fc must be INxOUT"),
        (["--fc", "4096x4096"], "--fc needs --rank"),
        (["--fc", "10x20", "--rank", "0"], "rank must be an integer >= 1"),
        (["--fc", "10x20", "--rank", "11"], "min(in, out) = 10"),
        (["mobilenet_v1_1.0_224", "--rank", "4"], "give --fc too; for a model's classifier use --classifier-rank"),
        (["--fc", "10x20", "--rank", "2", "--paper"], "exactly one of"),
        (["--fc", "10x20", "--rank", "2", "--alpha", "0.5"], "apply to a model NAME"),
        (["mobilenet_v1_1.0_224", "--classifier-rank", "1001"], "min(in features, classes)"),
        (["vgg16_224", "--alpha", "0.5"], "no width multiplier"),
    ],
)
def test_bad_fc_and_rank_input_exits_2(capsys, argv, expected):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("mobilenet cost: error:") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cost_of_a_checkpoint_reads_its_model_from_the_header(tmp_path, capsys):
    """`mobilenet cost runs/x/best.safetensors` is the cost of the model that checkpoint holds (as bench reads it)."""
    from mobilenet.checkpoint import save
    from mobilenet.models import create_model

    path = save(create_model("mobilenet_v2_0.5_96", num_classes=7), tmp_path / "best.safetensors")
    assert main(["cost", str(path), "--format", "json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    expected = count_costs("mobilenet_v2_0.5_96", num_classes=7)
    assert (from_file["macs"], from_file["params"]) == (expected.macs, expected.params)
    assert main(["cost", str(path), "--resolution", "128", "--format", "json"]) == 0
    assert (
        json.loads(capsys.readouterr().out)["macs"]
        == count_costs("mobilenet_v2_0.5_96", num_classes=7, resolution=128).macs
    )
    (tmp_path / "notes.safetensors").write_text("not a checkpoint")
    assert main(["cost", str(tmp_path / "notes.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
