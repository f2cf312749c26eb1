"""``mobilenet bench [MODEL...] [--backends ...] [--batch-sizes 1,32] [--int8] [--format table|json] [--plot FILE]``:
latency and throughput across runtimes, next to the analytic MACs and the CPU's measured GEMM peak."""

from __future__ import annotations

import argparse
import sys

from mobilenet.cli import shown_path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="latency/throughput across runtimes (torch, ONNX Runtime, OpenVINO; fp32, bf16, int8) vs the FLOP limit",
        description=(
            "Warm-up, then interleaved rounds across every backend so machine drift hits them alike; median, p90 "
            "and min latency, throughput, achieved GFLOP/s (2 * MACs / latency) and the ratio to the FLOP limit "
            "set by the float32 GEMM peak measured in the same run. Backends: eager, channels_last, jit, "
            "compile, onnxruntime, openvino, executorch, fused, openvino-bf16, onnxruntime-int8, openvino-int8, "
            "fused-int8, auto, auto-fast (default: all but compile, auto-fast and the int8 rows; one whose package, "
            "C extension or CPU feature is missing is left out with a note). Each row says its precision; "
            "'x fastest fp32' is against the fastest float32 runtime of the same model and batch."
        ),
    )
    parser.add_argument(
        "models",
        metavar="MODEL",
        nargs="*",
        default=["mobilenet_v2_1.0_224"],
        help="registered model names (random weights), .safetensors checkpoints, or exported files (.onnx fp32/int8, "
        ".ts, .pt2, .pte, .tflite: timed as they are, in their own runtime) (default: mobilenet_v2_1.0_224)",
    )
    parser.add_argument("--backends", help="comma-separated backends, or 'all' (default: see above)")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default: 1,32)")
    parser.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: torch's)")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="add the int8 rows: one static QDQ model in ONNX Runtime and OpenVINO, and our fused kernel's int8",
    )
    parser.add_argument("--compile", action="store_true", help="add torch.compile (compiles per batch size: slow)")
    parser.add_argument(
        "--calibration", help="directory of images to calibrate int8 on (default: random noise, speed only)"
    )
    parser.add_argument(
        "--int8-activations",
        choices=("auto", "int8", "uint8"),
        default="auto",
        help="activation type of the int8 model (default auto, as mobilenet quantize: uint8 on x86, else int8)",
    )
    parser.add_argument("--resolution", type=int, help="input side in pixels (default: each model's)")
    parser.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forwards per backend first (default: 5)")
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=60.0,
        help="idle time before each timed call, so the previous backend's spinning threads go to sleep (default: "
        "60, longer than the fused kernel's workers spin)",
    )
    parser.add_argument("--gemm-size", type=int, default=1024, help="side of the GEMM-peak matrices (default: 1024)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    parser.add_argument("--plot", help="write a PNG of the latencies against the FLOP limit")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from mobilenet.bench import MAX_PAUSE_S, bench, parse_backends, parse_batch_sizes
    from mobilenet.errors import MobileNetError
    from mobilenet.io import check_output_file
    from mobilenet.runtime import check_thread_count

    # (The allocator is tuned at start-up by mobilenet.cli.main for every command that runs models.)
    # Argument mistakes stop here, before any model is built.
    parse_batch_sizes(args.batch_sizes)
    parse_backends(args.backends, int8=args.int8, compile=args.compile)
    if args.threads is not None:
        check_thread_count(args.threads, "--threads")
    if args.rounds < 1:
        raise MobileNetError(f"--rounds must be at least 1, got {args.rounds}")
    if args.warmup < 0:
        raise MobileNetError(f"--warmup must be at least 0, got {args.warmup}")
    if not (math.isfinite(args.pause_ms) and 0 <= args.pause_ms <= 1e3 * MAX_PAUSE_S):
        raise MobileNetError(
            f"--pause-ms must be a number of milliseconds from 0 to {1e3 * MAX_PAUSE_S:g}, got {args.pause_ms}"
        )
    if args.plot:
        check_output_file(args.plot, "--plot", inputs=args.models)
    backends = args.backends
    if args.compile:
        backends = ",".join(parse_backends(args.backends, compile=True))

    def say(line: str) -> None:
        if not args.quiet:
            print(f"mobilenet bench: {line}", file=sys.stderr, flush=True)

    report = bench(
        args.models,
        backends=backends,
        batch_sizes=args.batch_sizes,
        threads=args.threads,
        int8=args.int8,
        resolution=args.resolution,
        rounds=args.rounds,
        warmup=args.warmup,
        gemm_size=args.gemm_size,
        calibration=args.calibration,
        pause=args.pause_ms / 1e3,
        int8_activations=args.int8_activations,
        progress=say,
    )
    data = report.to_dict()
    if args.plot:
        from mobilenet.plots import plot_bench

        data["plot"] = str(plot_bench(data, args.plot))
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        _print_table(data)
    return 0


def _print_table(data: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 150)
    machine = data["machine"]
    console.print(
        f"[bold]{escape(machine['cpu'])}[/bold], {machine['logical_cpus']} logical CPUs, "
        f"SIMD {' '.join(machine['simd'])}, "
        f"{machine['threads']} threads; torch {machine['torch']} ({machine['torch_cpu_capability']}), onnxruntime "
        f"{machine['onnxruntime'] or '-'}, openvino {machine.get('openvino') or '-'}; "
        f"allocator: {machine['allocator']['reason']}; load average at start "
        f"{' '.join(f'{v:.2f}' for v in machine['load_average'] or [])}"
    )
    console.print(
        f"float32 GEMM peak (torch.mm {data['settings']['gemm_size']}^2, same run): "
        f"[bold]{data['gemm_peak']['gflops']:.1f} GFLOP/s[/bold]; {data['convention']}"
    )
    pause_ms = 1e3 * data["settings"]["pause_s"]
    console.print(
        f"every timed call follows {pause_ms:g} ms of idle time (--pause-ms; longer than any runtime's idle threads "
        "spin, so none is timed under another's): the latency of a request after idle time, which runs colder than "
        "a stream of images (one runtime alone, back to back: benchmarks/runtime_alone.py)"
    )
    for model in data["models"]:
        rows = [r for r in data["results"] if r["model"] == model["model"]]
        limits = ", ".join(
            f"batch {batch}: {next(r['flop_limit_ms'] for r in rows if r['batch_size'] == batch):.2f} ms"
            for batch in dict.fromkeys(r["batch_size"] for r in rows)
        )
        table = Table(
            # A model's path may hold "[/b]", which rich would read as markup.
            title=f"{escape(model['model'])} at {model['resolution']}px: {model['macs_per_image'] / 1e6:.1f}M MACs "
            "per image",
            caption=f"FLOP limit (2 * MACs * batch / GEMM peak): {limits}",
        )
        table.add_column("batch", justify="right")
        table.add_column("backend", no_wrap=True)
        table.add_column("precision", no_wrap=True)
        for column in ("median ms", "p90 ms", "min ms", "img/s", "GFLOP/s", "x FLOP limit", "x fastest fp32"):
            table.add_column(column, justify="right")
        table.add_column("max |diff|", justify="right")
        for batch in dict.fromkeys(r["batch_size"] for r in rows):
            group = sorted((r for r in rows if r["batch_size"] == batch), key=lambda r: r["latency_ms"]["median"])
            for index, row in enumerate(group):
                latency = row["latency_ms"]
                diff = row["max_abs_diff"]
                ratio = row["x_fastest_fp32_runtime"]
                table.add_row(
                    str(batch) if index == 0 else "",
                    row["backend"],
                    row.get("precision", "fp32"),
                    f"{latency['median']:.2f}",
                    f"{latency['p90']:.2f}",
                    f"{latency['min']:.2f}",
                    f"{row['throughput_ips']:.1f}",
                    f"{row['gflops']:.1f}",
                    f"{row['x_flop_limit']:.2f}",
                    "-" if ratio is None else f"{ratio:.2f}",
                    "-" if diff is None else f"{diff:.1e}",
                    end_section=index == len(group) - 1,
                )
        console.print(table)
    for note in data["notes"]:
        console.print(f"note: {note}", markup=False)
    if data.get("plot"):
        console.print(f"plot: {shown_path(data['plot'])}", markup=False)
