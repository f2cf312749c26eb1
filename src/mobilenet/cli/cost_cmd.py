"""``mobilenet cost``: the analytic cost model on the command line (no torch is imported).

- ``mobilenet cost NAME [--alpha A] [--resolution R] [--format table|json|csv|markdown]``: every layer with its
  input/output shape (the effective channels after the width multiplier), multiply-adds, parameters and
  activations; the totals; the breakdown by layer type as the V1 paper's Table 2.
- ``mobilenet cost --layer 416x416x50 --out 10 --kernel 3``: one layer, standard vs depthwise separable
  (V1 paper section 3.1, equations 2, 4 and 5).
- ``mobilenet cost --paper``: the papers' Tables 1-7 (V1), the V2 headline figures and TF-slim's checkpoint
  tables, each published figure beside ours.
- ``mobilenet cost --fc 4096x4096 --rank 512``: one fully connected layer, full vs its truncated-SVD
  factorisation (``in -> rank -> out``).
- ``mobilenet cost vgg16_224``: VGG-16, the V1 paper's Table 8 baseline; ``--classifier-rank R`` counts any model
  with a factored classifier.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

from mobilenet.cli import shown_path
from mobilenet.errors import MobileNetError

FORMATS = ("table", "json", "csv", "markdown")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cost",
        help="multiply-adds, parameters and shapes of a model, a layer, or the papers' tables (no torch needed)",
        description=(
            "Analytic cost model (papers' convention: 1 MAC = 1 multiply-add = 2 FLOPs; conv and FC layers only). "
            "Give a model NAME, or --layer HxWxM --out N, or --fc INxOUT --rank R, or --paper."
        ),
    )
    parser.add_argument(
        "name",
        nargs="?",
        help="registered model name (see `mobilenet models`), or a .safetensors checkpoint / .onnx file: its model",
    )
    parser.add_argument("--alpha", type=float, help="width multiplier (any finite number > 0)")
    parser.add_argument("--resolution", type=int, help="input side in pixels (>= 32)")
    parser.add_argument("--num-classes", type=int, dest="num_classes", help="classifier outputs (>= 1)")
    parser.add_argument("--small-input", action="store_true", default=None, help="CIFAR-style stem (total stride 8)")
    parser.add_argument(
        "--classifier-rank",
        type=int,
        dest="classifier_rank",
        metavar="R",
        help="count the model with its classifier factored as features -> R -> classes",
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--layer", metavar="HxWxM", help="one layer's input, e.g. 416x416x50: standard vs separable")
    parser.add_argument("--out", type=int, metavar="N", help="output channels of the --layer")
    parser.add_argument("--kernel", type=int, metavar="DK", help="kernel side of the --layer (default 3)")
    parser.add_argument("--stride", type=int, help="stride of the --layer (default 1)")
    parser.add_argument("--fc", metavar="INxOUT", help="one fully connected layer, e.g. 4096x4096: full vs factored")
    parser.add_argument("--rank", type=int, metavar="R", help="rank of the --fc layer's factorisation (in -> R -> out)")
    parser.add_argument("--paper", action="store_true", help="reproduce the papers' tables, published vs ours")
    parser.add_argument("--output", "-o", metavar="FILE", help="write to FILE (atomically) instead of stdout")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.output:
        from mobilenet.io import check_output_file

        check_output_file(args.output, "--output")
    _check_modes(args)
    if args.layer:
        text = _layer(args)
    elif args.fc:
        text = _fc(args)
    elif args.paper:
        text = paper_report(args.format)
    else:
        text = _model(args)
    _emit(text, args.output)
    return 0


def _check_modes(args: argparse.Namespace) -> None:
    """Exactly one mode, and each option only with the mode it belongs to."""
    given_modes = (("NAME", args.name), ("--layer", args.layer), ("--fc", args.fc), ("--paper", args.paper))
    modes = [mode for mode, given in given_modes if given]
    if len(modes) != 1:
        got = " and ".join(modes) if modes else "none"
        raise MobileNetError(f"give exactly one of a model NAME, --layer HxWxM, --fc INxOUT or --paper (got {got})")
    if not args.layer:
        layer_only = [flag for flag in ("out", "kernel", "stride") if getattr(args, flag) is not None]
        if layer_only:
            flags = ", ".join(f"--{flag}" for flag in layer_only)
            raise MobileNetError(f"{flags} describe the one layer of --layer HxWxM; give --layer too")
    if not args.fc and args.rank is not None:
        hint = "; for a model's classifier use --classifier-rank" if args.name else ""
        raise MobileNetError(f"--rank is the rank of the --fc INxOUT layer's factorisation; give --fc too{hint}")
    if args.name is None:
        model_options = {
            "alpha": args.alpha,
            "resolution": args.resolution,
            "num_classes": args.num_classes,
            "classifier_rank": args.classifier_rank,
        }
        given = [f"--{key.replace('_', '-')}" for key, value in model_options.items() if value is not None]
        if args.small_input:
            given.append("--small-input")
        if given:
            raise MobileNetError(f"{', '.join(given)} apply to a model NAME, not to --layer, --fc or --paper")


def _emit(text: str, output: str | None) -> None:
    if output:
        from mobilenet.io import atomic_write_text

        atomic_write_text(output, text)
        print(f"wrote {shown_path(output)}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _console(buffer: io.StringIO) -> Any:
    from rich.console import Console

    # Rendered into a buffer so that --output gets the same text; wide enough for the notes, colour only on a tty.
    terminal = sys.stdout.isatty()
    return Console(
        file=buffer, width=160, highlight=False, force_terminal=terminal, color_system="auto" if terminal else None
    )


def _millions(value: int) -> str:
    return f"{value / 1e6:,.2f}M"


# --------------------------------------------------------------------------------------------------------------


def _model(args: argparse.Namespace) -> str:
    from dataclasses import replace

    from mobilenet.cost import count_costs

    options = {
        "alpha": args.alpha,
        "resolution": args.resolution,
        "num_classes": args.num_classes,
        "small_input": args.small_input,
        "classifier_rank": args.classifier_rank,
    }
    if _is_file(args.name):
        given = {key: value for key, value in options.items() if value is not None}
        table = count_costs(replace(_file_config(args.name), **given))
    else:
        table = count_costs(args.name, **options)
    if args.format == "json":
        return table.to_json() + "\n"
    if args.format == "csv":
        return table.to_csv()
    if args.format == "markdown":
        return table.to_markdown()
    return _model_table(table)


#: Files whose model `cost` reads from the metadata written with them.
_MODEL_FILE_SUFFIXES = (".safetensors", ".onnx")


def _is_file(name: str) -> bool:
    from pathlib import Path

    if Path(name).suffix.lower() in _MODEL_FILE_SUFFIXES or "/" in name:
        return True
    try:
        return Path(name).exists()
    except OSError:  # a name too long for a file name (ENAMETOOLONG) is no file: looked up as a model name
        return False


def _file_config(name: str) -> Any:
    """The model config stored in a checkpoint's header or an ONNX file's metadata (no weights are read)."""
    from pathlib import Path

    path = Path(name)
    if path.suffix.lower() == ".onnx":
        from mobilenet.export import read_onnx_metadata
        from mobilenet.spec import ModelConfig

        return ModelConfig.from_dict(read_onnx_metadata(path)["config"])
    from mobilenet.checkpoint import read_config

    return read_config(path)


def _model_table(table: Any) -> str:
    from rich.table import Table
    from rich.text import Text

    from mobilenet.cost import MAC_CONVENTION, format_shape

    config = table.config
    buffer = io.StringIO()
    console = _console(buffer)
    title = (
        f"{table.name}: {config.family.upper()}, alpha {config.alpha:g}, resolution {config.resolution}, "
        f"{config.num_classes} classes" + (", small input" if config.small_input else "")
    )
    layers = Table(title=title, caption=MAC_CONVENTION, show_lines=False)
    for header, justify in (
        ("#", "right"),
        ("layer", "left"),
        ("type", "left"),
        ("input HxWxC", "right"),
        ("output HxWxC", "right"),
        ("s", "right"),
        ("MACs", "right"),
        ("params", "right"),
        ("activations", "right"),
    ):
        layers.add_column(header, justify=justify)  # type: ignore[arg-type]
    for index, row in enumerate(table.rows):
        layers.add_row(
            str(index),
            Text(row.name),
            row.label,
            format_shape(row.in_shape),
            format_shape(row.out_shape),
            str(row.stride),
            f"{row.macs:,}",
            f"{row.params:,}",
            f"{row.activations:,}",
        )
    layers.add_section()
    layers.add_row(
        "", "total", "", "", "", "", f"{table.macs:,}", f"{table.params:,}", f"{table.activations:,}", style="bold"
    )
    console.print(layers)

    breakdown = Table(title="By layer type (the form of the V1 paper's Table 2)")
    for header in ("type", "MACs", "share", "params", "share"):
        breakdown.add_column(header, justify="left" if header == "type" else "right")
    for share in table.by_op():
        breakdown.add_row(
            share.label,
            f"{share.macs:,}",
            f"{100 * share.macs_share:.2f}%",
            f"{share.params:,}",
            f"{100 * share.params_share:.2f}%",
        )
    console.print(breakdown)

    totals = Table(title="Totals", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row(
        "multiply-adds (MACs)", f"{table.macs:,}  ({_millions(table.macs)}, {2 * table.macs / 1e9:.3f} GFLOPs)"
    )
    totals.add_row(
        "parameters, papers' convention (conv + FC weights)", f"{table.params:,}  ({_millions(table.params)})"
    )
    totals.add_row("parameters with the FC bias (TF-slim's V2 convention)", f"{table.params_with_bias:,}")
    totals.add_row("trainable parameters (+ biases, BatchNorm) = sum(p.numel())", f"{table.trainable_params:,}")
    totals.add_row("activations (output elements of every layer, one image)", f"{table.activations:,}")
    totals.add_row("peak activations (largest input + output of one layer)", f"{table.peak_activations:,}")
    console.print(totals)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------


def _layer(args: argparse.Namespace) -> str:
    from mobilenet.cost import layer_cost, parse_shape

    if args.out is None:
        raise MobileNetError("--layer needs --out N, the number of output channels (filters)")
    height, width, channels = parse_shape(args.layer)
    kernel = 3 if args.kernel is None else args.kernel
    stride = 1 if args.stride is None else args.stride
    cost = layer_cost(height, width, channels, args.out, kernel=kernel, stride=stride)
    if args.format == "json":
        import json

        return json.dumps(cost.to_dict(), indent=2) + "\n"
    rows = [
        ("standard conv", cost.standard_macs, cost.standard_params),
        ("depthwise", cost.depthwise_macs, cost.depthwise_params),
        ("pointwise", cost.pointwise_macs, cost.pointwise_params),
        ("depthwise separable", cost.separable_macs, cost.separable_params),
    ]
    ratio_line = (
        f"separable / standard: MACs {cost.macs_ratio:.4f} (1/N + 1/Dk^2 = 1/{cost.out_channels} + "
        f"1/{cost.kernel**2} = {cost.formula_ratio:.4f}; {1 / cost.macs_ratio:.2f}x fewer), "
        f"params {cost.params_ratio:.4f} ({1 / cost.params_ratio:.2f}x fewer)"
    )
    shape = f"{cost.height}x{cost.width}x{cost.in_channels} -> {cost.out_height}x{cost.out_width}x{cost.out_channels}"
    title = f"One layer {shape}, Dk = {cost.kernel}, stride {cost.stride} (V1 paper section 3.1, equations 2, 4, 5)"
    return _small_table(
        args.format,
        title,
        (("MACs", "macs"), ("params", "params")),
        rows,
        ratio_line,
        (cost.macs_ratio, cost.params_ratio),
        bold="depthwise separable",
    )


# --------------------------------------------------------------------------------------------------------------


def _fc(args: argparse.Namespace) -> str:
    from mobilenet.cost import factored_fc_cost, parse_fc

    in_features, out_features = parse_fc(args.fc)
    if args.rank is None:
        raise MobileNetError("--fc needs --rank R, the inner width of the factorisation in -> R -> out")
    cost = factored_fc_cost(in_features, out_features, args.rank)
    if args.format == "json":
        import json

        return json.dumps(cost.to_dict(), indent=2) + "\n"
    shape = f"{cost.in_features}x{cost.out_features}"
    rows = [
        (f"full {cost.in_features} -> {cost.out_features}", cost.params_full, cost.macs_full),
        (
            f"factored {cost.in_features} -> {cost.rank} -> {cost.out_features}",
            cost.params_factored,
            cost.macs_factored,
        ),
    ]
    ratio_line = (
        f"factored / full: {cost.ratio:.4f} ({1 / cost.ratio:.2f}x fewer parameters and multiply-adds); "
        f"factoring saves only below rank {cost.break_even_rank:.1f} = in * out / (in + out)"
    )
    title = f"One fully connected layer {shape} and its rank-{cost.rank} truncated-SVD factorisation"
    columns = (("params (weights)", "params"), ("MACs (one input)", "macs"))
    return _small_table(args.format, title, columns, rows, ratio_line, (cost.ratio, cost.ratio))


def _small_table(
    fmt: str,
    title: str,
    columns: tuple[tuple[str, str], tuple[str, str]],
    rows: list[tuple[str, int, int]],
    ratio_line: str,
    ratios: tuple[float, float],
    *,
    bold: str | None = None,
) -> str:
    """A few named rows of two counts (``columns``: the table's heading and the CSV/markdown name of each) with a
    ratio line, as csv, markdown or a rich table: ``cost --layer`` and ``cost --fc``."""
    from mobilenet.cost import MAC_CONVENTION

    (first, first_short), (second, second_short) = columns
    if fmt == "csv":
        lines = [f"layer,{first_short},{second_short}"] + [f"{name},{a},{b}" for name, a, b in rows]
        return "\n".join([*lines, f"ratio,{ratios[0]},{ratios[1]}"]) + "\n"
    if fmt == "markdown":
        heading = f"| | {first_short.replace('macs', 'MACs')} | {second_short.replace('macs', 'MACs')} |"
        lines = [f"### {title}", "", f"_{MAC_CONVENTION}._", "", heading, "|---|--:|--:|"]
        lines += [f"| {name} | {a:,} | {b:,} |" for name, a, b in rows]
        return "\n".join([*lines, "", ratio_line]) + "\n"
    from rich.table import Table

    buffer = io.StringIO()
    console = _console(buffer)
    console.print(title, markup=False)
    table = Table()
    for header in ("", first, second):
        table.add_column(header, justify="left" if not header else "right")
    for name, a, b in rows:
        table.add_row(name, f"{a:,}", f"{b:,}", style="bold" if name == bold else None)
    console.print(table)
    console.print(ratio_line, markup=False)
    console.print(MAC_CONVENTION, markup=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------


def paper_report(fmt: str = "table") -> str:
    """The reproduction of the papers' tables as text in ``fmt`` (table, json, csv or markdown), for `cost --paper`
    and for a demo that wants to print it."""
    from mobilenet.paper import reproduce, tables_to_json, tables_to_markdown

    tables = reproduce()
    if fmt == "json":
        return tables_to_json(tables) + "\n"
    if fmt == "markdown":
        return tables_to_markdown(tables)
    if fmt == "csv":
        import csv

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["table", "item", "quantity", "published", "ours", "difference", "status", "note"])
        for table in tables:
            for row in table.rows:
                writer.writerow(
                    [table.key, row.item, row.quantity, row.published, row.ours, row.difference, row.status, row.note]
                )
        return buffer.getvalue()
    return _paper_rich(tables)


def _paper_rich(tables: Any) -> str:
    from rich.table import Table
    from rich.text import Text

    from mobilenet.cost import MAC_CONVENTION

    styles = {"match": "green", "match (truncated)": "yellow", "differs": "red"}
    buffer = io.StringIO()
    console = _console(buffer)
    console.print(Text("The MobileNet papers' figures, reproduced by the analytic cost model", style="bold"))
    console.print(Text(MAC_CONVENTION))
    total = matched = 0
    for paper_table in tables:
        table = Table(
            title=paper_table.title, caption=f"{paper_table.source}. {paper_table.note}".strip(), expand=False
        )
        table.add_column("item")
        table.add_column("quantity")
        table.add_column("published", justify="right", no_wrap=True)
        table.add_column("ours", justify="right", no_wrap=True)
        table.add_column("difference", justify="right")
        table.add_column("status")
        table.add_column("note", max_width=60)
        for row in paper_table.rows:
            table.add_row(
                Text(row.item),
                row.quantity,
                Text(row.format_published()),
                Text(row.format_ours()),
                row.format_difference(),
                Text(row.status, style=styles[row.status]),
                Text(row.note),
            )
        console.print()
        console.print(table)
        total += len(paper_table.rows)
        matched += paper_table.matches
    console.print()
    console.print(
        Text(
            f"{matched} of {total} published figures match our count (rounded or truncated as the source prints "
            f"them); each of the other {total - matched} has a note saying why."
        )
    )
    return buffer.getvalue()
