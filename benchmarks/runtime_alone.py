"""One runtime timed alone, in its own process: no other runtime's threads share the cores, so what is measured is
the runtime and how fast its idle threads wake.

``--pause`` sleeps before each timed call: 0 times calls back to back; 0.02 (20 ms) times a stream of single images
with idle time between them, where a runtime whose threads sleep pays their wake-up. Backend names are those of
:data:`mobilenet.backends.BACKENDS`, plus ``onnxruntime-stop`` (an ONNX Runtime session whose threads stop spinning
after every run: ``mobilenet.export.ort_session(..., spin=False)``).

    python benchmarks/runtime_alone.py --model mobilenet_v2_1.0_224 --backend fused --pause 0.02
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from mobilenet.backends import BACKENDS, load_source
from mobilenet.export import INPUT_NAME, export_onnx, ort_session
from mobilenet.models import create_model
from mobilenet.runtime import describe_machine, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--backend", default="onnxruntime", help="a BACKENDS name, or onnxruntime-stop")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds of idle time before each timed call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    set_threads(args.threads)
    torch.manual_seed(0)
    source = load_source(create_model(args.model).eval())
    if args.backend == "onnxruntime-stop":
        path = export_onnx(source.model, Path(tempfile.mkdtemp()) / "m.onnx").path
        session = ort_session(path, args.threads, spin=False)

        def run(x: torch.Tensor) -> object:
            return session.run(None, {INPUT_NAME: x.numpy()})[0]
    else:
        run = BACKENDS[args.backend](source, num_threads=args.threads)
    size = source.config.resolution
    x = torch.randn(1, 3, size, size)
    for _ in range(5):
        run(x)
    times = []
    for _ in range(args.calls):
        if args.pause:
            time.sleep(args.pause)
        start = time.perf_counter()
        run(x)
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    machine = describe_machine(args.threads)
    result = {
        "model": args.model,
        "backend": args.backend,
        "pause_s": args.pause,
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(times[0], 3),
        "p90_ms": round(times[int(0.9 * len(times))], 3),
        "machine": {key: machine[key] for key in ("cpu", "simd", "threads", "load_average")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
