"""Thread settings of the CPU runtimes, measured rather than assumed: for each setting, the latency of the runtime
alone and of the Predictor's loop (one image preprocessed by torch on one thread, then the runtime), interleaved in
one process at batch 1.

Settings tried:

- ONNX Runtime: intra-op threads spinning after a run (its default) vs stopped after every run
  (``session.force_spinning_stop``, what :func:`mobilenet.export.ort_session` sets) vs never spinning
  (``session.intra_op.allow_spinning=0``);
- OpenVINO: its default vs threads pinned to cores (``ENABLE_CPU_PINNING``).

    python benchmarks/thread_settings.py --model mobilenet_v2_1.0_224 --threads 2 --rounds 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from mobilenet.data import build_eval_transform, resolve_preprocessing
from mobilenet.export import export_onnx
from mobilenet.models import create_model
from mobilenet.runtime import describe_machine, set_threads, torch_threads
from mobilenet.timing import Candidate, summarize_timings, time_interleaved


def ort_runner(path: Path, threads: int, entries: dict[str, str]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in entries.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})[0]


def openvino_runner(path: Path, threads: int, extra: dict[str, object]):
    import openvino

    core = openvino.Core()
    model = core.read_model(str(path))
    model.reshape([1, 3, 224, 224])
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": threads, **extra}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    return lambda x: request.infer({0: x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    set_threads(args.threads)
    model = create_model(args.model).eval()
    transform = build_eval_transform(resolve_preprocessing(None, model.config.resolution))
    image = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runners = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(model, Path(tmp) / "m.onnx").path
        runners["ort spinning (default)"] = ort_runner(path, args.threads, {})
        runners["ort stop after run"] = ort_runner(path, args.threads, {"session.force_spinning_stop": "1"})
        runners["ort never spin"] = ort_runner(path, args.threads, {"session.intra_op.allow_spinning": "0"})
        runners["openvino default"] = openvino_runner(path, args.threads, {})
        runners["openvino pinned"] = openvino_runner(path, args.threads, {"ENABLE_CPU_PINNING": True})
    ready = transform(image).unsqueeze(0).numpy()

    def loop(run):
        def step(_x):
            with torch_threads(1):
                batch = np.ascontiguousarray(transform(image).unsqueeze(0).numpy())
            return run(batch)

        return step

    candidates = [Candidate(f"{name}: runtime", name, lambda _x, r=run: r(ready)) for name, run in runners.items()]
    candidates += [Candidate(f"{name}: predict loop", name, loop(run)) for name, run in runners.items()]
    times = time_interleaved(candidates, None, rounds=args.rounds, warmup=5, pause=0.0)
    medians = {name: summarize_timings(samples)["median"] for name, samples in times.items()}
    for name, ms in medians.items():
        print(f"{name:40s} {ms:8.3f} ms")
    machine = describe_machine(args.threads)
    print(json.dumps({"median_ms": medians, "machine": {k: machine[k] for k in ("cpu", "simd", "threads")}}))


if __name__ == "__main__":
    main()
