"""``mobilenet select --latency-ms X [--family v1,v2] [--threads N] [--batch 1] [--plot FILE]``: the most accurate
published MobileNet within a latency budget, measured on this machine (cached), with a Pareto plot."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

from mobilenet.cli import shown_path

if TYPE_CHECKING:
    from mobilenet.select import SelectResult

#: Where the Pareto plot goes when --plot is not given.
DEFAULT_PLOT = "select_pareto.png"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "select",
        help="the most accurate MobileNet (published top-1) within a latency budget, measured on this machine",
        description=(
            "Times every (width, resolution) MobileNet with a published ImageNet top-1 (V1 Tables 6, 7 and 9, V2 "
            "Table 4) on this machine, in interleaved rounds (median), and prints the most accurate one within "
            "the budget and the Pareto front of accuracy vs latency. Measurements are cached per model, batch, "
            "threads, backend, CPU and library versions ($XDG_CACHE_HOME/mobilenet/select.json), so asking "
            "again is instant."
        ),
    )
    parser.add_argument(
        "--latency-ms", type=float, required=True, dest="latency_ms", help="latency budget per batch in ms (> 0)"
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="numeric precision (default: fp32); bf16 on CPUs with AVX512-BF16 or AMX, timed on openvino-bf16 and "
        "shown with float32's published top-1",
    )
    parser.add_argument("--family", default="v1,v2", help="model families, comma-separated (default: v1,v2)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's current count)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default: 1)")
    parser.add_argument(
        "--backend",
        choices=("auto", "torch", "torch-channels-last", "torch-jit", "onnxruntime", "openvino", "openvino-bf16"),
        default="auto",
        help="runtime to time with (default: auto, what mobilenet predict runs)",
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed interleaved rounds per model (default: 15)")
    parser.add_argument("--no-cache", action="store_true", help="measure again, ignoring cached measurements")
    parser.add_argument("--cache", metavar="FILE", help="cache file (default: $XDG_CACHE_HOME/mobilenet/select.json)")
    parser.add_argument(
        "--plot",
        help=f"PNG of accuracy vs latency, checked before measuring (default: {DEFAULT_PLOT} in the current "
        "directory, where it can be written)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="output: a table, or the whole result as JSON"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mobilenet.errors import MobileNetError
    from mobilenet.io import check_output_file
    from mobilenet.runtime import check_thread_count
    from mobilenet.select import parse_families, select_model

    if not math.isfinite(args.latency_ms) or args.latency_ms <= 0:
        raise MobileNetError(f"--latency-ms must be a finite number of milliseconds > 0, got {args.latency_ms}")
    parse_families(args.family)  # an unknown family is refused before torch starts measuring
    if args.threads is not None:
        check_thread_count(args.threads, "--threads")
    if args.plot is not None:  # asked for: a path it cannot be written to is refused before measuring
        check_output_file(args.plot, "--plot", inputs=[args.cache])

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"select: {line}", file=sys.stderr, flush=True)

    result = select_model(
        args.latency_ms,
        precision=args.precision,
        families=args.family,
        threads=args.threads,
        batch=args.batch,
        backend=args.backend,
        use_cache=not args.no_cache,
        cache_path=args.cache,
        rounds=args.rounds,
        progress=progress,
    )
    plot_note = _write_plot(result, args.plot or DEFAULT_PLOT)
    if result.pick is None:
        fastest = result.fastest
        raise MobileNetError(
            f"no model runs within {args.latency_ms:g} ms here; the fastest is {fastest['model']} at "
            f"{fastest['latency_ms']:.2f} ms ({result.backend}, {result.threads} threads, batch {result.batch})"
        )
    if args.format == "json":
        print(json.dumps({**result.to_dict(), "plot_note": plot_note}, indent=2))
        return 0
    print(_report(result))
    for note in [*result.notes, plot_note]:
        print(f"note: {note}")
    return 0


def _write_plot(result: SelectResult, path: str) -> str:
    """Write the plot; where the default path cannot be written (a read-only working directory), a note, not a
    failure: the measurements are the point, and an explicit --plot was checked before they started."""
    from mobilenet.select import write_plot

    try:
        written = write_plot(result, path)
    except (OSError, ValueError) as error:
        return f"the plot could not be written to {shown_path(path)}: {getattr(error, 'strerror', None) or error}"
    return f"Pareto plot written to {shown_path(written)}"


def _report(result: SelectResult) -> str:
    r = result
    machine = r.machine
    simd = " ".join(machine.get("simd") or []) or "none"
    lines = [
        f"machine: {machine.get('cpu')} ({machine.get('logical_cpus')} CPUs usable; SIMD {simd}); torch "
        f"{machine.get('torch')}, onnxruntime {machine.get('onnxruntime') or 'not installed'}",
        f"timed with: {r.backend} {r.precision}, {r.threads} threads, batch {r.batch}",
        _provenance(r),
        "",
        f"{'model':<24} {'top-1 %':>7}  {'published in':<11} {'MACs (M)':>8} {'latency ms':>10}  pareto",
    ]
    for p in sorted(r.points, key=lambda p: p["latency_ms"]):
        mark = "*" if p["pareto"] else ""
        pick = "  <- pick" if p["model"] == r.pick["model"] else ""
        lines.append(
            f"{p['model']:<24} {p['top1']:>7.1f}  {p['source']:<11} {p['macs'] / 1e6:>8.0f} "
            f"{p['latency_ms']:>10.2f}  {mark:^6}{pick}"
        )
    pick = r.pick
    lines += [
        "",
        f"pick for {r.budget_ms:g} ms: {pick['model']} (alpha {pick['alpha']:g}, {pick['resolution']}px): "
        f"top-1 {pick['top1']:.1f}% ({pick['source']}), {pick['latency_ms']:.2f} ms median, "
        f"{pick['macs'] / 1e6:.0f}M MACs",
    ]
    return "\n".join(lines)


def _provenance(result: SelectResult) -> str:
    measured, cached = result.measured, result.cached
    where = result.cache_path
    parts = []
    if measured:
        parts.append(f"measured now: {len(measured)} models in {result.measure_seconds:.1f} s")
    if cached:
        parts.append(f"from the cache ({where}): {len(cached)} models")
    return "; ".join(parts)
