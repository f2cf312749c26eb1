"""What the Predictor adds to the runtime at batch 1: its checks, tensor conversions and preprocessing, measured
against the bare backend on the same model, interleaved in one process.

Three paths, each timed per image:

- ``runtime``: the chosen backend on an already preprocessed float batch (what the runtime itself costs);
- ``transform + runtime``: the eval transform of the uint8 image (on one torch thread) then the backend: the floor
  for a prediction from pixels, without anything else the Predictor does;
- ``predict, input size``: ``Predictor.predict`` of a uint8 image already at the model's input size (decode-free:
  the Predictor's own overhead, checks, conversion, normalisation and the softmax/top-k);
- ``predict, resize``: the same of a 256 px image the eval transform resizes and crops (what a camera frame costs).

Prints each median, the overhead of each path as a fraction of the runtime's time, and the Predictor's own
overhead (``predict, input size`` against ``transform + runtime``: checks, conversions, stacking, softmax, top-k).
That difference is small against the run-to-run spread of a runtime on shared cores, so it is also measured
without a runtime: ``predict`` with the runtime replaced by a stand-in returning fixed logits, against the
transform alone.

    python benchmarks/predictor_overhead.py --model mobilenet_v2_1.0_224 --threads 2
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from mobilenet.predict import Predictor
from mobilenet.runtime import describe_machine, set_threads, torch_threads
from mobilenet.timing import Candidate, summarize_timings, time_interleaved


def measure(model: str, threads: int, backend: str, rounds: int) -> dict:
    set_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a model name: random weights, which do not change the speed
        predictor = Predictor(model, backend=backend, num_threads=threads, batch_size=1)
    size = int(predictor.preprocessing["input_size"])
    generator = torch.Generator().manual_seed(0)
    exact = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
    larger = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=generator)
    ready = predictor.preprocess(exact).unsqueeze(0)

    def transform_and_run(_x: object) -> torch.Tensor:
        with torch_threads(1):
            batch = predictor.preprocess(exact).unsqueeze(0)
        return predictor.logits(batch)

    candidates = [
        Candidate("runtime", "the backend on a preprocessed batch", lambda _x: predictor.logits(ready)),
        Candidate("transform + runtime", "eval transform, then the backend", transform_and_run),
        Candidate("predict, input size", "Predictor.predict, uint8 at input size", lambda _x: predictor.predict(exact)),
        Candidate("predict, resize", "Predictor.predict, uint8 256 px", lambda _x: predictor.predict(larger)),
    ]
    times = time_interleaved(candidates, None, rounds=rounds, warmup=5, pause=0.0)
    medians = {name: summarize_timings(samples)["median"] for name, samples in times.items()}
    base = medians["runtime"]
    own = _own_work(predictor, exact, rounds * 10)
    return {
        "model": model,
        "backend": predictor.backend_name,
        "threads": threads,
        "median_ms": medians,
        "overhead_vs_runtime": {name: ms / base - 1 for name, ms in medians.items() if name != "runtime"},
        "predictor_own_overhead": medians["predict, input size"] / medians["transform + runtime"] - 1,
        "own_work_ms": own,
        "own_work_vs_runtime": own["predict, stand-in runtime"] / base - own["transform alone"] / base,
        "machine": {k: describe_machine(threads)[k] for k in ("cpu", "simd", "torch", "onnxruntime", "openvino")},
    }


def _own_work(predictor: Predictor, image: torch.Tensor, calls: int) -> dict[str, float]:
    """Median ms of the eval transform alone and of ``predict`` with the runtime replaced by a stand-in that
    returns fixed logits: their difference is the Predictor's own work (checks, conversions, softmax, top-k),
    measured without a runtime whose threads would blur a difference this small."""
    logits = predictor.logits(predictor.preprocess(image).unsqueeze(0))
    runtime, predictor.logits = predictor.logits, lambda _batch: logits

    def transform() -> torch.Tensor:
        with torch_threads(1):
            return predictor.preprocess(image).unsqueeze(0)

    candidates = [
        Candidate("transform alone", "eval transform on one thread", lambda _x: transform()),
        Candidate("predict, stand-in runtime", "Predictor.predict, fixed logits", lambda _x: predictor.predict(image)),
    ]
    try:
        times = time_interleaved(candidates, None, rounds=calls, warmup=20, pause=0.0)
    finally:
        predictor.logits = runtime
    return {name: summarize_timings(samples)["median"] for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    result = measure(args.model, args.threads, args.backend, args.rounds)
    for name, ms in result["median_ms"].items():
        extra = result["overhead_vs_runtime"].get(name)
        print(f"{name:22s} {ms:8.3f} ms" + ("" if extra is None else f"   overhead {100 * extra:+.1f}%"))
    print(
        f"the Predictor's own overhead (predict vs transform + runtime): {100 * result['predictor_own_overhead']:+.1f}%"
    )
    for name, ms in result["own_work_ms"].items():
        print(f"{name:26s} {ms:8.3f} ms")
    print(
        "the Predictor's own work (stand-in runtime minus transform alone) as a share of the runtime: "
        f"{100 * result['own_work_vs_runtime']:+.2f}%"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
