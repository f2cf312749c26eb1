from __future__ import annotations

import ctypes
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mobilenet.errors import MobileNetError
from mobilenet.io import (
    atomic_path,
    atomic_write_text,
    json_safe,
    libjpeg_lost_data,
    libjpeg_warnings,
    loads_json,
    read_regular_file,
    remove_stale_temporaries,
)


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "file.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "file.json"
    atomic_write_text(target, "good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "text.json", "{}")
        # safetensors creates its own file with mode 0o600: the mode is still the umask's.
        with atomic_path(tmp_path / "weights.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    for name in ("text.json", "weights.safetensors", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    target = tmp_path / "last.safetensors"
    dead = _dead_pid()
    stale = tmp_path / f".last.safetensors.{dead}-0a1b2c3d.tmp"
    legacy = tmp_path / ".last.safetensors.k2_9xq0a.tmp"  # tempfile.mkstemp's naming, of earlier versions
    other_file = tmp_path / f".best.safetensors.{dead}-0a1b2c3d.tmp"
    live = tmp_path / f".last.safetensors.{os.getppid()}-0a1b2c3d.tmp"  # a writer that still runs
    unrelated = tmp_path / ".notes.tmp"
    for path in (stale, legacy, other_file, live, unrelated):
        path.write_bytes(b"half")
    atomic_write_text(target, "new")
    # The write of last.safetensors removes its own dead temporaries only.
    assert not stale.exists() and not legacy.exists()
    assert other_file.exists() and live.exists() and unrelated.exists()
    assert remove_stale_temporaries(tmp_path) == [other_file]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, unrelated.name])


def test_a_temporary_being_written_is_not_stale(tmp_path):
    with atomic_path(tmp_path / "file.json") as tmp:
        tmp.write_text("in progress")
        assert remove_stale_temporaries(tmp_path) == []
        assert tmp.exists()
    assert (tmp_path / "file.json").read_text() == "in progress"


def test_json_safe_writes_null_for_non_finite_numbers():
    row = {"loss": float("nan"), "top1": 0.5, "history": [float("inf"), -float("inf"), 1], "name": "x"}
    assert json.loads(json.dumps(json_safe(row), allow_nan=False)) == {
        "loss": None,
        "top1": 0.5,
        "history": [None, None, 1],
        "name": "x",
    }


def test_check_output_file_accepts_new_and_existing_files_and_leaves_nothing(tmp_path):
    from mobilenet.io import check_output_file

    existing = tmp_path / "old.txt"
    existing.write_text("x")
    assert check_output_file(tmp_path / "new" / "deeper" / "f.txt", "--out") == tmp_path / "new" / "deeper" / "f.txt"
    assert check_output_file(existing, "--out") == existing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]  # no probe file, no directory made


def test_check_output_file_refuses_directory_file_parent_and_an_input(tmp_path):
    from mobilenet.errors import MobileNetError
    from mobilenet.io import check_output_file

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(a_file)
    for path, inputs, words in (
        (tmp_path, (), "is a directory"),
        (a_file / "x" / "y.txt", (), "which is a file"),
        (link, (a_file,), "same file"),
        (tmp_path / "." / "a_file", (str(a_file),), "same file"),
        ("", (), "empty"),
    ):
        with pytest.raises(MobileNetError, match=words):
            check_output_file(path, "--out", inputs=inputs)
    assert a_file.read_text() == "x"


def test_check_output_file_with_an_input_in_a_symlink_loop_is_no_traceback(tmp_path, capsys):
    """A symlink loop as the input (Path.resolve raises RuntimeError there, not OSError) is no other file: the output
    check passes and the reader refuses the input in one line."""
    from mobilenet.cli import main
    from mobilenet.io import check_output_file

    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(tmp_path / "back.safetensors")
    (tmp_path / "back.safetensors").symlink_to(loop)
    out = tmp_path / "out.onnx"
    assert check_output_file(out, "--out", inputs=[loop]) == out
    assert main(["export", str(loop), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "loop.safetensors" in err, err
    assert not out.exists()


def test_check_output_dir_refuses_a_file(tmp_path):
    from mobilenet.errors import MobileNetError
    from mobilenet.io import check_output_dir

    (tmp_path / "f").write_text("x")
    assert check_output_dir(tmp_path / "run", "--out") == tmp_path / "run"
    assert check_output_dir(tmp_path, "--out") == tmp_path
    with pytest.raises(MobileNetError, match="not a directory"):
        check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(MobileNetError, match="which is a file"):
        check_output_dir(tmp_path / "f" / "run", "--out")
    assert not (tmp_path / "run").exists()


def test_unwritable_directory_is_refused(tmp_path):
    import os

    from mobilenet.errors import MobileNetError
    from mobilenet.io import check_output_file

    directory = Path("/proc/self") if os.geteuid() == 0 else tmp_path / "ro"
    if directory != Path("/proc/self"):
        directory.mkdir()
        directory.chmod(0o555)
    with pytest.raises(MobileNetError, match="cannot write"):
        check_output_file(directory / "x.txt", "--out")


def test_regular_file_size_refuses_a_fifo_without_opening_it(tmp_path):
    import os

    from mobilenet.errors import MobileNetError
    from mobilenet.io import regular_file_size

    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(MobileNetError, match="not a regular file"):
        regular_file_size(fifo, "checkpoint", "a file")
    (tmp_path / "f").write_bytes(b"abc")
    assert regular_file_size(tmp_path / "f", "checkpoint", "a file") == 3


def test_a_failed_write_leaves_no_directory_it_created(tmp_path):
    from mobilenet.io import atomic_path

    target = tmp_path / "new" / "deeper" / "file.onnx"
    with pytest.raises(RuntimeError, match="calibration failed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("calibration failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "kept" / "f.txt"):
        raise RuntimeError("x")
    assert (tmp_path / "kept").is_dir()  # it was there before


def test_read_regular_file_reads_within_its_limit_and_refuses_the_rest(tmp_path):
    small = tmp_path / "small.json"
    small.write_bytes(b'{"a": 1}')
    assert read_regular_file(small, "the cache", "a JSON file", limit=8) == b'{"a": 1}'
    with pytest.raises(MobileNetError, match=r"the cache .*small.json holds 8 bytes, over its 7-byte limit"):
        read_regular_file(small, "the cache", "a JSON file", limit=7)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open or read would never return
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")  # endless: read whole, it would fill the memory
    cases = [
        (fifo, "not a regular file .a FIFO, socket or device.; expected a JSON file"),
        (zero, "not a regular file"),
        (tmp_path, "is a directory; expected a JSON file"),
        (tmp_path / "missing", "does not exist; expected a JSON file"),
        (tmp_path / "dangling", "does not exist"),
    ]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for path, words in cases:
        with pytest.raises(MobileNetError, match=words):
            read_regular_file(path, "the cache", "a JSON file", limit=1 << 20)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_read_regular_file_refuses_an_unreadable_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("{}")
    secret.chmod(0)
    with pytest.raises(MobileNetError, match=r"cannot read the cache .*Permission denied"):
        read_regular_file(secret, "the cache", "a JSON file", limit=100)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
def test_loads_json_reports_a_document_nested_too_deeply_as_malformed(text):
    with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
        loads_json(text)
    assert loads_json(b'{"a": [[1]]}') == {"a": [[1]]}


def test_check_outside_directory_refuses_the_folder_and_below_it(tmp_path):
    from mobilenet.io import check_outside_directory

    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    for inside in (data, data / "a" / "x.png", data / "new" / "run", data / "a" / ".." / "b"):
        with pytest.raises(MobileNetError, match="inside the --data folder"):
            check_outside_directory(inside, "--out", data, "the --data folder")
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(MobileNetError, match="inside"):
        check_outside_directory(tmp_path / "link" / "run", "--out", data, "the --data folder")
    for outside in (tmp_path / "run", tmp_path / "data2", tmp_path):
        check_outside_directory(outside, "--out", data, "the --data folder")
    check_outside_directory(data / "run", "--out", tmp_path / "missing", "the --data folder")  # no such folder
    check_outside_directory(data / "run", "--out", None, "the --data folder")


def test_a_write_that_finds_no_room_is_one_error_and_leaves_the_file(tmp_path, monkeypatch):
    import errno

    import mobilenet.io
    from mobilenet.errors import OutputWriteError

    target = tmp_path / "kept.bin"
    target.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mobilenet.io.os, "fsync", full)
    with pytest.raises(OutputWriteError) as error:
        mobilenet.io.atomic_write_bytes(target, b"new")
    assert isinstance(error.value, OSError) and isinstance(error.value, MobileNetError)
    assert error.value.errno == errno.ENOSPC and error.value.strerror == os.strerror(errno.ENOSPC)
    assert str(error.value).startswith(f"cannot write {target}: No space left on device;")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.bin"]

    def broken(fd: int) -> None:  # other failures stay what they are
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(mobilenet.io.os, "fsync", broken)
    with pytest.raises(OSError) as error:
        mobilenet.io.atomic_write_bytes(target, b"new")
    assert not isinstance(error.value, MobileNetError)


def test_libjpeg_warnings_leave_python_writes_to_stderr_where_they_go(capfd):
    """Only the C library's stream is swapped: a progress bar drawn by Python meanwhile shows at once, not after."""
    with libjpeg_warnings() as lines:
        sys.stderr.write("progress 3/10\n")
        sys.stderr.flush()
        assert capfd.readouterr().err == "progress 3/10\n"
    assert lines == []


def test_libjpeg_warnings_collects_libjpeg_lines_and_passes_the_rest_on(capfd):
    libc = ctypes.CDLL(None)
    libc.fputs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    with libjpeg_warnings() as lines:
        stream = ctypes.c_void_p.in_dll(libc, "stderr").value
        libc.fputs(b"Corrupt JPEG data: premature end of data segment\n", stream)
        libc.fputs(b"some other library's note\n", stream)
        assert capfd.readouterr().err == ""  # held until the block ends
    assert lines == ["Corrupt JPEG data: premature end of data segment"]
    assert libjpeg_lost_data(lines) == lines[0]
    assert capfd.readouterr().err == "some other library's note\n"
