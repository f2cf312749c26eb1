from __future__ import annotations

from pathlib import Path

import pytest

from mobilenet.io import atomic_path, atomic_write_text


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
