"""How much memory ONNX Runtime takes for a MobileNet's activations: in a fresh process that imports only
onnxruntime and numpy (so no freed torch memory is reused), the resident memory after the session is created
(weights loaded, nothing run) and after its first run at batch 1 (the arena and memory pattern allocated), read from
/proc/self/statm; the difference is what running added. Compare with the fused kernel's activation peak
(`benchmarks/fused_network.py`) and the layer-by-layer peak.

    python benchmarks/ort_arena.py --model mobilenet_v2_1.0_224 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from mobilenet.export import export_onnx
from mobilenet.models import create_model

CHILD = r"""
import json, os, sys
import numpy as np
import onnxruntime as ort

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

path, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
start = resident()
options = ort.SessionOptions()
options.intra_op_num_threads = threads
session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
loaded = resident()
session.run(None, {session.get_inputs()[0].name: x})
ran = resident()
for _ in range(5):
    session.run(None, {session.get_inputs()[0].name: x})
print(json.dumps({"session_mb": (loaded - start) / 1e6, "first_run_mb": (ran - loaded) / 1e6,
                  "after_six_runs_mb": (resident() - loaded) / 1e6}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2_1.0_224")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    model = create_model(args.model).eval()
    size = model.config.resolution
    path = export_onnx(model, Path(tempfile.mkdtemp()) / "m.onnx").path
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(size), str(args.threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(done.stdout)
    print(json.dumps({"model": args.model, **{key: round(value, 2) for key, value in figures.items()}}))


if __name__ == "__main__":
    main()
