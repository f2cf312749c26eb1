"""Writing files so that nothing is lost: a file is either the old one or the complete new one, never half.

A checkpoint written while the machine loses power or the run is killed must not replace a good checkpoint with a
truncated one: write to a temporary file in the same directory, flush and fsync it, then rename it over the target
(rename is atomic on POSIX and Windows within one filesystem) and fsync the directory so the rename itself is durable.

A process killed between creating the temporary file and the rename cannot remove it; the temporaries are named
``.<target name>.<pid>-<random>.tmp`` so that a later write of the same target (or
:func:`remove_stale_temporaries` over a directory) recognises those whose writer is gone and removes them.
Nothing is lost either when a long job cannot write its result at the end: :func:`check_output_file` and
:func:`check_output_dir` refuse an output path before the work starts (a directory where a file goes, a path below
a file, a directory that cannot be written, an input about to be overwritten); :func:`regular_file_size` refuses an
input that is not a regular file (a FIFO would block a reader forever), :func:`read_regular_file` reads a small one
within a size limit, and :func:`loads_json` parses JSON from a file without letting a hostile document escape as
anything but a malformed one. :func:`libjpeg_warnings` collects the warnings libjpeg prints through the C
library's stderr (a JPEG whose data ends early decodes with grey padding and only that warning), for the decoders
to refuse such a file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import re
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mobilenet.errors import NO_ROOM_ERRNOS, MobileNetError, OutputWriteError

try:  # POSIX: run directories are locked with flock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "check_outside_directory",
    "directory_lock",
    "finite_json_number",
    "is_within",
    "json_safe",
    "libjpeg_lost_data",
    "libjpeg_warnings",
    "loads_json",
    "read_regular_file",
    "regular_file_size",
    "remove_stale_temporaries",
]

# The temporaries this process is writing now: never stale, even though their pid is alive and ours.
_ACTIVE: set[Path] = set()
# ".<name>.<pid>-<hex>.tmp"; and mkstemp's ".<name>.<8 characters>.tmp" of earlier versions, whose writer is gone.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-[0-9a-f]+|[a-z0-9_]{8})\.tmp$")


# libjpeg warnings that mean pixels were made up: the scan data ended early (the rest is grey) or is damaged.
_LIBJPEG_LOST_DATA = ("premature end", "bad huffman code", "instead of rst", "invalid sos parameters")
# libjpeg's other warnings (such as extraneous bytes before a marker) leave every pixel decoded: not repeated.
_LIBJPEG_PREFIXES = ("corrupt jpeg data", "premature end of jpeg file", "warning:", "invalid sos parameters")
# One capture at a time: the C library's stderr is one variable of the process.
_STDERR_LOCK = threading.Lock()


@functools.cache
def _c_stdio() -> tuple[Any, ctypes.c_void_p] | None:
    """The C library and its ``stderr`` variable (glibc's name, or macOS's ``__stderrp``), or None where either
    cannot be found (then nothing is captured)."""
    try:
        libc = ctypes.CDLL(None)
        libc.open_memstream.restype = ctypes.c_void_p
        libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
        libc.fclose.argtypes = [ctypes.c_void_p]
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    for name in ("stderr", "__stderrp"):
        try:
            return libc, ctypes.c_void_p.in_dll(libc, name)
        except ValueError:
            continue
    return None


@contextlib.contextmanager
def libjpeg_warnings() -> Iterator[list[str]]:
    """Collect the lines that C code inside the block prints through the C library's ``stderr`` (libjpeg prints its
    warnings there, with no other way to see them): libjpeg's go into the list yielded, anything else is written on
    to stderr afterwards. Only the C library's stream is swapped, for an in-memory one, never file descriptor 2:
    Python's own writes (a progress bar drawn by another thread) go where they always go. Where the C library's
    stream cannot be reached, nothing is collected."""
    lines: list[str] = []
    stdio = _c_stdio()
    if stdio is None:
        yield lines
        return
    libc, stream_variable = stdio
    buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
    with _STDERR_LOCK:
        memory = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
        if not memory:
            yield lines
            return
        saved = stream_variable.value
        stream_variable.value = memory
        try:
            yield lines
        finally:
            stream_variable.value = saved
            libc.fclose(memory)  # flushes: buffer and size now hold everything written
            said = ctypes.string_at(buffer.value, size.value).decode("utf-8", "replace") if buffer.value else ""
            libc.free(buffer)
    others = []
    for line in filter(None, (line.strip() for line in said.splitlines())):
        (lines if line.lower().startswith(_LIBJPEG_PREFIXES) else others).append(line)
    if others:
        os.write(2, ("\n".join(others) + "\n").encode())


def libjpeg_lost_data(warnings: Iterable[str]) -> str | None:
    """The first of libjpeg's ``warnings`` (from :func:`libjpeg_warnings`) that means pixels were made up, or None."""
    return next((line for line in warnings if any(sign in line.lower() for sign in _LIBJPEG_LOST_DATA)), None)


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) for the block, so that two processes never
    write one run directory at once; a second process asking for it gets :class:`MobileNetError` at once instead
    of waiting. The lock is ``flock`` on the directory itself: no lock file is left behind, and the system releases
    it when the process ends however it ends (no stale lock after a crash or ``kill -9``). A directory created here
    and still empty at the end is removed again. Where ``fcntl`` is missing (Windows) or the filesystem cannot
    lock, nothing is locked."""
    target = Path(directory)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MobileNetError(
                    f"{what} {target} is in use by another process that is writing a run there; wait for it to "
                    f"finish (then --resume it if it was stopped) or choose another {what}"
                ) from None
            except OSError:
                pass  # a filesystem without locks: run unlocked, as before
        yield target
    finally:
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # only if empty: nothing was written


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, fsync it and rename it over ``path``.

    The caller writes the temporary file by name (as ``safetensors.torch.save_file`` and matplotlib want). On an
    exception the temporary file is removed and ``path`` is untouched. The file gets the mode a plain ``open()``
    gives a new file (``0o666`` less the umask). Temporaries of ``path`` left by a killed writer are removed first.
    Directories created for ``path`` are removed again when the write fails (nothing is left behind).
    """
    target = Path(path)
    created = _make_parents(target.parent)
    remove_stale_temporaries(target.parent, name=target.name)
    tmp, mode = _create_temporary(target)
    _ACTIVE.add(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            # A writer that replaced the file (safetensors creates its files with mode 0o600) changed the mode.
            if os.name == "posix" and stat.S_IMODE(os.fstat(handle.fileno()).st_mode) != mode:
                os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        for directory in created:
            with contextlib.suppress(OSError):  # not empty (another writer) or gone: leave it
                directory.rmdir()
        if isinstance(error, OSError) and error.errno in NO_ROOM_ERRNOS and not isinstance(error, OutputWriteError):
            raise _no_room(target, error) from None
        raise
    finally:
        _ACTIVE.discard(tmp)


def _no_room(target: Path, error: OSError) -> OutputWriteError:
    failure = OutputWriteError(
        f"cannot write {target}: {error.strerror or error}; what was at {target} is as it was (free some space or "
        "choose another path)"
    )
    failure.errno, failure.strerror, failure.filename = error.errno, error.strerror, str(target)
    return failure


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing ancestors; the ones created, deepest first."""
    missing = []
    current = directory
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(directory: str | os.PathLike[str], *, name: str | None = None) -> list[Path]:
    """Remove the temporaries of :func:`atomic_path` in ``directory`` (only those of the file ``name`` when given)
    whose writing process no longer runs; returns what was removed. Other processes' live writes are kept."""
    folder = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or (name is not None and match["name"] != name) or entry in _ACTIVE:
            continue
        if match["pid"] is not None and _process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():  # the temporaries are files: a directory so named is not one
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/infinite float replaced by None, so that ``json.dumps`` writes standard JSON
    (``null``) instead of the non-standard ``NaN`` tokens other readers reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def _create_temporary(target: Path) -> tuple[Path, int]:
    """A new empty file beside ``target`` and its permission bits, created as ``open()`` creates files (mode 0o666
    less the umask, which ``tempfile.mkstemp``'s 0o600 would not respect)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this process's own files are live only while :data:`_ACTIVE` holds them)."""
    if pid == os.getpid():
        return False
    if os.name != "posix":
        return True  # no cheap check: keep the file rather than remove a live write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_file(
    path: str | os.PathLike[str], what: str, *, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Path:
    """Refuse, before any work starts, a file path that the work could not be written to in the end.

    Refused: an existing directory, FIFO or device; a path below an existing file; a directory that cannot be
    written (tried by creating and removing an empty temporary file there, which is what the atomic write will do,
    so read-only filesystems and permissions are both caught); and the same file as one of ``inputs`` (writing
    over an input would replace what the work reads). ``what`` names the option in the message (``"--out"``).
    """
    target = Path(path)
    if str(path) == "":
        raise MobileNetError(f"{what} is empty; expected a file path")
    try:
        info = target.stat()
    except (FileNotFoundError, NotADirectoryError):  # the parent check below says which part is missing or a file
        info = None
    except OSError as error:
        raise MobileNetError(f"{what} {target}: {error.strerror or error}; expected a writable file path") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise MobileNetError(f"{what} {target} is a directory; expected a file path")
        if not stat.S_ISREG(info.st_mode):
            raise MobileNetError(f"{what} {target} is not a regular file (a FIFO, socket or device); expected a file")
    _refuse_input(target, what, inputs)
    _check_writable_parent(target, what)
    return target


def check_output_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Refuse, before any work starts, a directory path that the work could not write into: an existing file
    (or FIFO, device), a path below a file, or a directory (or its nearest existing parent) that cannot be
    written. The directory is not created here."""
    target = Path(path)
    if str(path) == "":
        raise MobileNetError(f"{what} is empty; expected a directory path")
    try:
        info = target.stat()
    except (FileNotFoundError, NotADirectoryError):  # the parent check below says which part is missing or a file
        info = None
    except OSError as error:  # a name too long, a symlink loop: Path.exists() raises some of these itself
        reason = error.strerror or error
        raise MobileNetError(f"{what} {target}: {reason}; expected a writable directory path") from None
    if info is None:
        _check_writable_parent(target, what)
    elif stat.S_ISDIR(info.st_mode):
        _probe_directory(target, what, target)
    else:
        raise MobileNetError(f"{what} {target} is a file, not a directory; expected a directory path")
    return target


def _refuse_input(target: Path, what: str, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    for source in inputs:
        if source is None or not isinstance(source, str | os.PathLike):
            continue
        source_path = Path(source)
        same = False
        # Path.resolve raises RuntimeError on a symlink loop (Python < 3.13): such a path is no other file.
        with contextlib.suppress(OSError, RuntimeError):
            same = target.resolve() == source_path.resolve() or (
                target.exists() and source_path.exists() and os.path.samefile(target, source_path)
            )
        if same:
            raise MobileNetError(
                f"{what} {target} is the same file as {source_path}, which this command reads or writes: choose "
                "another path"
            )


def is_within(path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is ``directory`` or lies below it, both resolved (links followed); False where either cannot
    be resolved (``Path.resolve`` raises RuntimeError on a symlink loop before Python 3.13: such a path is in no
    folder)."""
    try:
        target, outer = Path(path).resolve(), Path(directory).resolve()
    except (OSError, RuntimeError):
        return False
    return target == outer or outer in target.parents


def check_outside_directory(
    path: str | os.PathLike[str], what: str, directory: str | os.PathLike[str] | None, directory_what: str
) -> None:
    """Refuse an output ``path`` that is ``directory`` or lies below it, when ``directory`` is an existing folder
    the command reads (a data folder): what is written there changes the input (a plot saved in a class folder is
    a new image of that class, a run directory in a data folder a new class, a plot may overwrite an image)."""
    if directory is None:
        return
    is_folder = False
    with contextlib.suppress(OSError):
        is_folder = Path(directory).is_dir()
    if is_folder and is_within(path, directory):
        raise MobileNetError(
            f"{what} {path} is inside {directory_what} {directory}, which this command reads: writing there would "
            "change its images; choose a path outside it"
        )


def _check_writable_parent(target: Path, what: str) -> None:
    """The nearest existing ancestor of ``target`` must be a directory this process can create files in."""
    ancestor = target.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise MobileNetError(f"{what} {target} is below {ancestor}, which is a file; expected a path in a directory")
    _probe_directory(ancestor, what, target)


def _probe_directory(directory: Path, what: str, target: Path) -> None:
    # os.access says yes to root on a read-only filesystem and no on some network mounts: try what the write does.
    try:
        fd, name = tempfile.mkstemp(prefix=".mobilenet-probe.", dir=directory)
    except OSError as error:
        raise MobileNetError(
            f"{what} {target}: cannot write in {directory} ({error.strerror or error}); choose a writable path"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def regular_file_size(file: Path, what: str, expected: str) -> int:
    """The size of ``file``, refusing a missing path, a directory, or a FIFO/device (whose reads block or never
    end) with a message that says what was ``expected``."""
    try:
        info = file.stat()
    except FileNotFoundError:
        raise MobileNetError(f"{what} {file} does not exist; expected {expected}") from None
    except OSError as error:
        raise MobileNetError(f"cannot read {what} {file}: {error.strerror or error}") from None
    _refuse_special_file(info, file, what, expected)
    return info.st_size


def _refuse_special_file(info: os.stat_result, file: Path, what: str, expected: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise MobileNetError(f"{what} {file} is a directory; expected {expected}")
    if not stat.S_ISREG(info.st_mode):
        raise MobileNetError(f"{what} {file} is not a regular file (a FIFO, socket or device); expected {expected}")


def read_regular_file(file: Path, what: str, expected: str, *, limit: int) -> bytes:
    """The bytes of ``file``, refusing (with a message that says what was ``expected``) what
    :func:`regular_file_size` refuses and a file of more than ``limit`` bytes. The file is opened without blocking
    and checked through the open descriptor, so a path swapped for a FIFO after a check cannot hang the reader, and
    a device such as /dev/zero is never read."""
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MobileNetError(f"{what} {file} does not exist; expected {expected}") from None
    except OSError as error:
        raise MobileNetError(f"cannot read {what} {file}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        _refuse_special_file(info, file, what, expected)
        if info.st_size > limit:
            raise MobileNetError(f"{what} {file} holds {info.st_size:,} bytes, over its {limit:,}-byte limit")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as error:
        raise MobileNetError(f"cannot read {what} {file}: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if total > limit:  # grew while being read
        raise MobileNetError(f"{what} {file} holds more than its {limit:,}-byte limit")
    return b"".join(chunks)


def loads_json(text: str | bytes) -> Any:
    """``json.loads``, where a document nested too deeply for the parser (which would raise RecursionError) is a
    ``json.JSONDecodeError`` like any other malformed JSON, so a reader's handling of corrupt files covers it."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", text if isinstance(text, str) else "", 0) from None


def finite_json_number(value: Any, *, integer: bool = False) -> float | None:
    """``value`` as a float where it is a number read from JSON (an int where ``integer``; never a bool) that is
    finite as a float, else None: a file's JSON may hold NaN, Infinity, ``true`` or an integer of hundreds of
    digits, which ``float()`` cannot take."""
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
