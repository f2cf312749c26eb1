"""Writing files so that nothing is lost: a file is either the old one or the complete new one, never half.

A checkpoint written while the machine loses power or the run is killed must not replace a good checkpoint with a
truncated one: write to a temporary file in the same directory, flush and fsync it, then rename it over the target
(rename is atomic on POSIX and Windows within one filesystem) and fsync the directory so the rename itself is durable.

A process killed between creating the temporary file and the rename cannot remove it; the temporaries are named
``.<target name>.<pid>-<random>.tmp`` so that a later write of the same target (or
:func:`remove_stale_temporaries` over a directory) recognises those whose writer is gone and removes them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "json_safe",
    "remove_stale_temporaries",
]

# The temporaries this process is writing now: never stale, even though their pid is alive and ours.
_ACTIVE: set[Path] = set()
# ".<name>.<pid>-<hex>.tmp"; and mkstemp's ".<name>.<8 characters>.tmp" of earlier versions, whose writer is gone.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-[0-9a-f]+|[a-z0-9_]{8})\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, fsync it and rename it over ``path``.

    The caller writes the temporary file by name (as ``safetensors.torch.save_file`` and matplotlib want). On an
    exception the temporary file is removed and ``path`` is untouched. The file gets the mode a plain ``open()``
    gives a new file (``0o666`` less the umask). Temporaries of ``path`` left by a killed writer are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _ACTIVE.discard(tmp)


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


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
