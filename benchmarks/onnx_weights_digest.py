"""What checking an .onnx's weights digest adds to reading it: :func:`mobilenet.export.onnx_weights_digest` on the
parsed model, beside the ``onnx.load`` every reader already does and :func:`mobilenet.export.read_onnx_metadata` as a
whole (parse, digest check, metadata and signature checks). Medians of ``--repeats`` runs, the three interleaved
so that other load on the machine hits them alike; the model is exported once to a temporary file.

    python benchmarks/onnx_weights_digest.py --model mobilenet_v2_1.0_224 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import onnx

    from mobilenet.export import export_onnx, onnx_weights_digest, read_onnx_metadata
    from mobilenet.models import create_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(create_model(args.model), path)
        model = onnx.load(str(path), load_external_data=False)
        size = sum(onnx.numpy_helper.to_array(tensor).nbytes for tensor in model.graph.initializer)
        steps = {
            "onnx.load": lambda: onnx.load(str(path), load_external_data=False),
            "onnx_weights_digest": lambda: onnx_weights_digest(model),
            "read_onnx_metadata": lambda: read_onnx_metadata(path),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    print(f"{args.model}: {len(model.graph.initializer)} initializers, {size / 1e6:.1f} MB")
    for name, values in times.items():
        print(f"  {name:20s} median {statistics.median(values) * 1e3:6.1f} ms  (min {min(values) * 1e3:.1f})")
    share = statistics.median(times["onnx_weights_digest"]) / statistics.median(times["read_onnx_metadata"])
    print(f"  the digest is {share:.0%} of read_onnx_metadata")


if __name__ == "__main__":
    main()
