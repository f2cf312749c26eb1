#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): the papers' trade-offs on the GPU (benchmarks/gpu_reproduce.py)
# and, on two other cores of the same machine at the same time, the CPU speed checks of docs/speed.md (bench with the
# int8 rows, training images/s against torchvision, bf16 autocast where the CPU has it).
#
# The machine's python3 is another version than ours (3.12, its own torch): the C extension is built there; if that
# fails, a limited-API build made here (gpu_run/_fused_kernels.abi3.so) is used, else the fused rows are left out.
#
#   python benchmarks/pack_cifar10.py                      # gpu_run/cifar10.pack, 53.6 MiB
#   gcc -shared -fPIC -O3 -std=gnu11 -fno-math-errno -DPy_LIMITED_API=0x030B0000 $(python3-config --includes) \
#       src/mobilenet/_fused/fused.c -o gpu_run/_fused_kernels.abi3.so -pthread   # the fallback, any Python >= 3.11
#   device run, carry ["gpu_run"], timeout_s 600:  bash benchmarks/gpu_machine.sh
#
# Everything comes back as at most 8 files in $OUT (the tool's limit): log.txt, machine.txt, bench_cpu.txt,
# train_speed.txt, reproduce.tgz. Rehearsal on a CPU: REHEARSAL=1 OUT=/tmp/gm bash benchmarks/gpu_machine.sh
set -u
OUT=${OUT:-/tmp/gpu_machine_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
START=$(date +%s)
since() { echo "[$(( $(date +%s) - START )) s]"; }
PY=${PY:-python3}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/mobilenet_cache MPLBACKEND=Agg
if [ "${REHEARSAL:-0}" = 1 ]; then
    PACK=gpu_run/rehearsal.pack BUDGET=100 CPU_LIMIT=90 MODELS="mobilenet_v2_0.35_96"
    REPRO_ARGS="--experiments table5 --batch-size 16 --probe-batches 2 --limit-batches 4"
    BENCH_ARGS="--rounds 2 --warmup 1" TRAIN_ARGS="--steps 1 --rounds 1 --warmup 1 --resolution 96"
else
    PACK=gpu_run/cifar10.pack BUDGET=${BUDGET:-500} CPU_LIMIT=${CPU_LIMIT:-480}
    MODELS="mobilenet_v2_1.0_224 mobilenet_v1_1.0_224" REPRO_ARGS=""
    BENCH_ARGS="--rounds 20 --warmup 3" TRAIN_ARGS="--steps 3 --rounds 3 --warmup 2 --resolution 224"
fi

echo "$(since) machine"
{
    date -u
    lscpu
    grep -o -w -E 'amx_(bf16|int8|tile)|avx512_vnni|avx_vnni|avx512_bf16|avx512f' /proc/cpuinfo | sort | uniq -c
    nvidia-smi 2>&1 | head -20
    $PY -c 'import sys, torch, torchvision; print(sys.version); print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())'
    $PY -c 'import onnxruntime, onnx; print("onnxruntime", onnxruntime.__version__, "onnx", onnx.__version__)'
    $PY -c 'import openvino; print("openvino", openvino.__version__)' 2>&1 | tail -1
} > "$OUT/machine.txt" 2>&1
grep -E "Model name|^CPU\(s\)|Thread|amx|vnni" "$OUT/machine.txt"

echo "$(since) the C extension"
if ! timeout 180 $PY setup.py -q build_ext --inplace > /tmp/build_ext.log 2>&1; then
    tail -5 /tmp/build_ext.log
    [ -f gpu_run/_fused_kernels.abi3.so ] && cp gpu_run/_fused_kernels.abi3.so src/mobilenet/
fi
$PY -c 'from mobilenet.fused import fused_available; print("fused kernel available:", fused_available())'

# Two CPUs on two distinct physical cores for the CPU checks; the GPU run gets the rest.
read -r CPU_PAIR GPU_CPUS < <($PY - <<'EOF'
import os
cores = {}
for cpu in sorted(os.sched_getaffinity(0)):
    path = f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id"
    pkg = f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id"
    try:
        key = (open(pkg).read().strip(), open(path).read().strip())
    except OSError:
        key = ("0", str(cpu))
    cores.setdefault(key, []).append(cpu)
groups = list(cores.values())
pair = [groups[-1][0], groups[-2][0]] if len(groups) >= 3 else [groups[-1][0]]
taken = {c for g in groups if g[0] in pair for c in g}
rest = [c for c in sorted(os.sched_getaffinity(0)) if c not in taken] or pair
print(",".join(map(str, pair)), ",".join(map(str, rest)))
EOF
)
echo "CPU checks on CPUs $CPU_PAIR (distinct cores), the GPU run on $GPU_CPUS"

cpu_checks() {
    echo "$(since) cpu: bench"
    # shellcheck disable=SC2086
    COLUMNS=250 taskset -c "$CPU_PAIR" $PY -m mobilenet bench $MODELS --threads 2 --batch-sizes 1,32 \
        --backends onnxruntime,openvino,fused,auto --int8 $BENCH_ARGS --quiet > "$OUT/bench_cpu.txt" 2>&1
    echo "$(since) cpu: training images/s, float32"
    # shellcheck disable=SC2086
    taskset -c "$CPU_PAIR" $PY benchmarks/train_speed.py --batch-size 32 $TRAIN_ARGS --threads 2 \
        > "$OUT/train_speed.txt" 2>&1
    if grep -q -E 'amx_bf16|avx512_bf16' /proc/cpuinfo; then
        echo "$(since) cpu: training images/s, bf16 autocast"
        # shellcheck disable=SC2086
        taskset -c "$CPU_PAIR" $PY benchmarks/train_speed.py --batch-size 32 $TRAIN_ARGS --threads 2 --amp bf16 \
            >> "$OUT/train_speed.txt" 2>&1
    fi
    echo "$(since) cpu: done"
}
export START PY OUT CPU_PAIR MODELS BENCH_ARGS TRAIN_ARGS
export -f since cpu_checks
timeout "$CPU_LIMIT" bash -c cpu_checks &
CPU_JOB=$!

echo "$(since) gpu: reproduce"
# shellcheck disable=SC2086
taskset -c "$GPU_CPUS" $PY benchmarks/gpu_reproduce.py --pack "$PACK" --out /tmp/reproduce \
    --time-budget-s "$BUDGET" $REPRO_ARGS
echo "$(since) gpu: reproduce ended ($?)"
wait "$CPU_JOB"
echo "$(since) cpu checks ended ($?)"
tar czf "$OUT/reproduce.tgz" -C /tmp reproduce
ls -la "$OUT"
echo "$(since) done"
