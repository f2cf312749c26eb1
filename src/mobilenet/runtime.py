"""Process-wide runtime settings that make PyTorch on the CPU fast (the C allocator and the thread count), and the
description of the machine that every timing is reported with.

**The allocator** (:func:`tune_allocator`). glibc's ``malloc`` serves every request above its mmap threshold
(128 KiB at start, adapting up to 32 MiB) with a fresh ``mmap`` and hands it back with ``munmap`` on ``free``. A
MobileNet forward pass at 224x224 allocates and frees dozens of activation tensors of 1-50 MB, so every forward
maps fresh pages, and the kernel zero-fills each 4 KiB page on first touch (docs/speed.md counts the page faults
and the time they take).
``mallopt(M_MMAP_MAX, 0)`` keeps large blocks on the heap and ``mallopt(M_TRIM_THRESHOLD, <large>)`` stops
``free`` from giving the top of the heap back to the kernel, so the second forward reuses the first one's pages
(the same as starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``; glibc manual,
"Malloc Tunable Parameters"). The cost: the process keeps its peak heap until it exits, which is what a
long-running inference or training process wants anyway. ONNX Runtime has its own arena and is unaffected.

Set ``MOBILENET_NO_MALLOC_TUNING=1`` to leave the allocator alone (the CLI and the library then change nothing).

**Threads** (:func:`set_threads`): intra-op threads for torch (and the same number for ONNX Runtime sessions built
by this library); one inter-op thread, since a MobileNet is a chain of layers with nothing to run side by side.

**The machine** (:func:`describe_machine`): CPU, SIMD flags, threads, GPU, library versions, allocator setting and
load average, for ``mobilenet bench``, the benchmark scripts and ``mobilenet reproduce``'s report.
**The device** (:func:`resolve_device`): what ``--device`` names; ``auto`` picks CUDA, then Apple MPS, then the CPU.

**Measurement caches** (:func:`user_cache_path`, :func:`machine_identity`, :func:`read_cache`, :func:`write_cache`):
a versioned JSON file of measurements under the user's cache directory, each keyed by what was measured and the
part of :func:`describe_machine` a timing depends on (CPU model, SIMD flags, torch and ONNX Runtime versions). A
file that cannot be read or written is ignored with a note, never an exception: a cache only saves time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import json
import os
import platform
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mobilenet.errors import MobileNetError
from mobilenet.io import atomic_write_text, finite_json_number, json_safe, loads_json, read_regular_file

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "BF16_FLAGS",
    "FUSED_ISA_ENV",
    "INT8_DOT_FLAGS",
    "MAX_CACHED_LATENCY_MS",
    "NO_TUNING_ENV",
    "SIMD_FLAGS",
    "TRIM_THRESHOLD",
    "AllocatorTuning",
    "allocator_state",
    "check_thread_count",
    "check_worker_count",
    "cpu_flags",
    "describe_machine",
    "finite_positive",
    "has_int8_dot",
    "has_native_bf16",
    "machine_identity",
    "max_threads",
    "minor_faults",
    "plausible_latency_ms",
    "read_cache",
    "resolve_device",
    "set_threads",
    "torch_threads",
    "tune_allocator",
    "user_cache_path",
    "write_cache",
]

#: Environment variable that turns the allocator tuning off ("1", "true", "yes").
NO_TUNING_ENV = "MOBILENET_NO_MALLOC_TUNING"
#: The most bytes a measurement cache may hold: a few KiB per model measured; anything larger is not ours.
MAX_CACHE_BYTES = 16 * 1024 * 1024
#: M_TRIM_THRESHOLD used (mallopt takes a C int): 2 GiB of free heap top before glibc trims, i.e. practically never.
TRIM_THRESHOLD = 2**31 - 1
# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: CPU flags worth knowing for these kernels (AVX-512 VNNI / AVX-VNNI are int8 dot products).
SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
#: CPU flags of native bf16 arithmetic (AVX512-BF16's dot products, AMX's bf16 tiles): without one, bf16 is emulated.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: CPU flags of native 8-bit dot products (VNNI on x86, the dot-product extension on ARM).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


@dataclass(frozen=True)
class AllocatorTuning:
    """What :func:`tune_allocator` did.

    Attributes:
        applied: True when glibc's mallopt accepted both settings (now or in an earlier call of this process).
        reason: in words, what was done or why nothing was (opt-out, not glibc, mallopt refused).
    """

    applied: bool
    reason: str

    def __bool__(self) -> bool:
        return self.applied

    def to_dict(self) -> dict[str, object]:
        return {"applied": self.applied, "reason": self.reason}


_STATE: AllocatorTuning | None = None


def _opted_out() -> bool:
    return os.environ.get(NO_TUNING_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    libc_version = platform.libc_ver()[0]
    if libc_version != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def tune_allocator(*, force: bool = False) -> AllocatorTuning:
    """Keep large allocations on glibc's heap and stop trimming it (see the module docstring): calls
    ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)``.

    Idempotent: the first call decides, later calls return the same result (``force=True`` tries again, e.g.
    after the opt-out variable was removed). Does nothing, and says why in ``reason``, when
    ``MOBILENET_NO_MALLOC_TUNING=1`` is set or the C library is not glibc (macOS, Windows, musl); never raises.
    """
    global _STATE
    if _STATE is not None and not force:
        return _STATE
    if _opted_out():
        _STATE = AllocatorTuning(False, f"off: {NO_TUNING_ENV} is set")
        return _STATE
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        _STATE = AllocatorTuning(
            False, f"not applied: needs glibc's mallopt (this is {platform.system()} {platform.libc_ver()[0]})"
        )
        return _STATE
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok_mmap = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if ok_mmap and ok_trim:
        _STATE = AllocatorTuning(True, "glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB (activation pages reused)")
    else:
        _STATE = AllocatorTuning(False, f"not applied: mallopt refused (M_MMAP_MAX ok={ok_mmap}, trim ok={ok_trim})")
    return _STATE


def allocator_state() -> AllocatorTuning:
    """The result of this process's :func:`tune_allocator` call, or "not tuned" when none was made (the glibc
    variables ``MALLOC_MMAP_MAX_``/``MALLOC_TRIM_THRESHOLD_`` set in the environment are reported too)."""
    if _STATE is not None:
        return _STATE
    env = {k: os.environ[k] for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    if env:
        return AllocatorTuning(True, "by environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    return AllocatorTuning(False, "not tuned (glibc defaults)")


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage(RUSAGE_SELF).ru_minflt``; 0 where unavailable)."""
    if resource is None:  # pragma: no cover - Windows
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def max_threads() -> int:
    """The most threads a run may ask for: 4 per CPU of this machine, at least 64. More only oversubscribes the
    cores, and a thread pool of 100,000 (a typo) exhausts the memory or hangs while it starts."""
    return max(64, 4 * (os.cpu_count() or 1))


def check_thread_count(value: Any, what: str = "threads") -> int:
    """``value`` as a thread count: an integer in 1..:func:`max_threads`, else :class:`MobileNetError`."""
    return _check_count(value, what, lowest=1, meaning="4 per CPU")


def check_worker_count(value: Any, what: str = "--num-workers") -> int:
    """``value`` as a number of data-loading processes: an integer in 0..:func:`max_threads` (each worker is a
    process, so a typo of 100,000 would fork until the machine stalls), else :class:`MobileNetError`."""
    return _check_count(value, what, lowest=0, meaning="0: load in this process; at most 4 per CPU")


def _check_count(value: Any, what: str, *, lowest: int, meaning: str) -> int:
    """``value`` if it is an integer (not a bool) in ``lowest``..:func:`max_threads`, else :class:`MobileNetError`
    naming the range and what bounds it (``meaning``)."""
    limit = max_threads()
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= limit:
        raise MobileNetError(
            f"{what} must be an integer from {lowest} to {limit} ({meaning} of this machine's {os.cpu_count() or 1}, "
            f"at least 64), got {value!r}"
        )
    return value


def set_threads(num_threads: int | None) -> int:
    """Use ``num_threads`` intra-op threads in torch (None: leave torch's default, the number of physical cores)
    and one inter-op thread where torch still allows setting it; returns the intra-op count now in effect.

    Raises :class:`MobileNetError` for a count outside :func:`check_thread_count`'s range.
    """
    if num_threads is not None:
        check_thread_count(num_threads)
        if torch.get_num_threads() != num_threads:
            torch.set_num_threads(num_threads)
    with contextlib.suppress(RuntimeError):  # settable only before inter-op work starts; then it stays as it is
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (None: as they are), then restore the count.

    Used to keep torch's small pre- and post-processing ops on one thread while another runtime (ONNX Runtime,
    OpenVINO) owns the cores: two thread pools spinning on the same cores slow each other down many times over.
    """
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpuinfo() -> dict[str, str]:
    """The first value of each key of ``/proc/cpuinfo`` (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            info.setdefault(key, value)
    return info


def cpu_flags() -> set[str]:
    """This CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where there is none)."""
    return set(_cpuinfo().get("flags", "").split())


def _onnxruntime_version() -> str | None:
    # onnxruntime is an optional extra: imported here, only to read its version, so importing this module never
    # loads it.
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def _distribution_version(name: str) -> str | None:
    # Read from the installed distribution's metadata: importing openvino or executorch itself takes seconds.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _openvino_version() -> str | None:
    return _distribution_version("openvino")


def _executorch_version() -> str | None:
    return _distribution_version("executorch")


def has_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) computes in bf16 natively (:data:`BF16_FLAGS`)."""
    return bool(set(BF16_FLAGS) & (cpu_flags() if flags is None else flags))


def has_int8_dot(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) has 8-bit dot-product instructions (:data:`INT8_DOT_FLAGS`)."""
    return bool(set(INT8_DOT_FLAGS) & (cpu_flags() if flags is None else flags))


def describe_machine(threads: int | None = None) -> dict[str, Any]:
    """The machine every figure was measured on: CPU model, logical CPUs usable by this process (``logical_cpus``)
    and in the machine (``cpu_cores``), the SIMD flags that matter (:data:`SIMD_FLAGS`), torch's CPU capability,
    ``threads`` (default: torch's intra-op count, also reported as ``torch_threads``), the GPU (None without CUDA),
    library versions, the allocator setting and the load average now (a loaded machine makes every figure slower:
    compare ratios measured in one run)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": usable,
        "cpu_cores": os.cpu_count(),
        "simd": [flag for flag in SIMD_FLAGS if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "onnxruntime": _onnxruntime_version(),
        "openvino": _openvino_version(),
        "executorch": _executorch_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "allocator": allocator_state().to_dict(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA (this process's local rank), else Apple MPS, else CPU; an explicit name must exist (a CUDA
    index too), else :class:`MobileNetError` says what is available."""
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise MobileNetError(f"a device must be a string such as 'cpu' or 'cuda:0', got {type(name).__name__}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MobileNetError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type not in ("cpu", "cuda", "mps") or (device.type == "cpu" and device.index not in (None, 0)):
        raise MobileNetError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MobileNetError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise MobileNetError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MobileNetError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return device


# ---------------------------------------------------------------------------------------------------------------
# Measurement caches
# ---------------------------------------------------------------------------------------------------------------


def user_cache_path(filename: str) -> Path:
    """``$XDG_CACHE_HOME/mobilenet/<filename>``, else ``~/.cache/mobilenet/<filename>``. A relative
    ``$XDG_CACHE_HOME`` is ignored, as the XDG Base Directory specification asks (it would put a cache in whatever
    directory a command happens to start in)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else str(Path.home() / ".cache")
    return Path(base) / "mobilenet" / filename


#: Forces the fused kernel's instruction set (portable, avx2 or avx512; default: the best this CPU runs).
FUSED_ISA_ENV = "MOBILENET_FUSED_ISA"


def machine_identity(machine: dict[str, Any]) -> dict[str, Any]:
    """The fields of :func:`describe_machine` that a timing depends on and that stay fixed between runs (not the
    load average): CPU model, SIMD flags, the versions of torch and of every runtime ``auto`` may measure, and the
    fused kernel's instruction set where ``$MOBILENET_FUSED_ISA`` forces one (it then runs slower than it can; unset,
    the field is absent, so identities without it stay as they were)."""
    identity = {
        "cpu": machine.get("cpu"),
        "simd": list(machine.get("simd") or []),
        "torch": machine.get("torch"),
        "onnxruntime": machine.get("onnxruntime"),
        "openvino": machine.get("openvino"),
        "executorch": machine.get("executorch"),
    }
    forced_isa = os.environ.get(FUSED_ISA_ENV)
    if forced_isa:
        identity["fused_isa"] = forced_isa
    return identity


def read_cache(
    path: Path, *, version: int, valid: Callable[[Any], bool], notes: list[str], what: str
) -> dict[str, Any]:
    """The entries of the ``what`` cache at ``path`` that ``valid`` accepts, or none (with a line in ``notes``)
    when the file is unreadable or not of ``version``; a missing file is an empty cache, with no note."""
    if not os.path.lexists(path):
        return {}
    entries, problem = _cache_entries(path, version, what)
    if entries is None:
        notes.append(f"{problem}: ignored, measuring again")
        return {}
    return {key: value for key, value in entries.items() if valid(value)}


def _cache_entries(path: Path, version: int, what: str) -> tuple[dict[str, Any] | None, str]:
    """The entries of the version-``version`` ``what`` cache at ``path``, or None and why it is none."""
    try:
        data = loads_json(read_regular_file(path, "the cache", f"a {what} cache file", limit=MAX_CACHE_BYTES))
    except MobileNetError as error:
        return None, str(error)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"the cache {path} could not be read ({type(error).__name__})"
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == version else None
    if not isinstance(entries, dict):
        return None, f"the cache {path} is not a version-{version} {what} cache"
    return entries, ""


def write_cache(path: Path, entries: dict[str, Any], *, version: int, notes: list[str]) -> None:
    """Write ``entries`` to ``path`` atomically; a failure is a line in ``notes``. What was at ``path`` is never
    lost: a FIFO, a device, a socket or a directory there is left as it is (nothing is written), and a regular file
    that is not a version-``version`` cache (a file named by mistake, a damaged cache) is first renamed to
    ``NAME.unusable``. A symbolic link is replaced, never what it points to. Entries another process wrote since
    ``entries`` were read (two commands measuring at once) are kept beside them; for the same key, ``entries`` win."""
    try:
        if not _make_room_for_cache(path, version, notes):
            return
        written_meanwhile = _cache_entries(path, version, "measurement")[0] if os.path.lexists(path) else None
        merged = {**(written_meanwhile or {}), **entries}
        atomic_write_text(path, json.dumps({"version": version, "entries": json_safe(merged)}, indent=1))
    except OSError as error:
        notes.append(f"the cache {path} could not be written ({error.strerror or error}): the next call measures again")


def _make_room_for_cache(path: Path, version: int, notes: list[str]) -> bool:
    """Whether the cache may be written at ``path``: nothing there, a link, or a regular file (set aside first
    when it is not a cache of ``version``)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return True
    if stat.S_ISLNK(mode):
        return True
    if not stat.S_ISREG(mode):
        notes.append(
            f"the cache {path} is not a regular file: left as it is, not written; the next call measures again"
        )
        return False
    if _cache_entries(path, version, "measurement")[0] is None:
        aside = path.with_name(path.name + ".unusable")
        os.replace(path, aside)
        notes.append(f"the file that was at {path} is not a version-{version} cache: kept as {aside}")
    return True


def finite_positive(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool), finite and > 0 as a float: a latency a cache may hold (a
    JSON integer of 400 digits is no float)."""
    number = finite_json_number(value)
    return number is not None and number > 0


#: The longest latency a measurement cache may hold, in milliseconds (an hour): no timed forward takes longer, so a
#: larger figure is an edited or damaged cache, not a measurement.
MAX_CACHED_LATENCY_MS = 3_600_000.0


def plausible_latency_ms(value: Any) -> bool:
    """Whether ``value`` may be a measured latency in a cache: :func:`finite_positive` and at most
    :data:`MAX_CACHED_LATENCY_MS`."""
    return finite_positive(value) and float(value) <= MAX_CACHED_LATENCY_MS
