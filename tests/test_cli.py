"""The command line as a whole: every option of every subcommand says what it does and what its default is."""

from __future__ import annotations

import argparse
import os

import pytest

from mobilenet.cli import COMMANDS, build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_is_registered():
    assert set(_subparsers()) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_its_default_is_shown(command, capsys):
    parser = _subparsers()[command]
    undocumented = [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert undocumented == [], f"{command}: options without help: {undocumented}"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, True, argparse.SUPPRESS):
            assert "default" in (action.help or "") or f"(default: {action.default})" in text, (
                f"{command} {action.option_strings[0]}: default {action.default!r} not shown"
            )


def test_a_reader_that_goes_away_gets_no_traceback():
    """`mobilenet models | head -0`: the reader is gone before the first write; no traceback, no "Exception
    ignored" noise, exit code 1."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: the first write fails with EPIPE
    process = subprocess.Popen([sys.executable, "-m", "mobilenet", "models"], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_models_lists_who_publishes_weights(capsys):
    assert main(["models", "mobilenet_v2_1.0_224"]) == 0
    out = capsys.readouterr().out
    assert "torchvision, timm" in out.splitlines()[1]
    assert main(["models", "zzz"]) == 2
    assert "no registered model matches 'zzz'" in capsys.readouterr().err


def test_an_error_naming_a_path_with_a_newline_stays_one_line(tmp_path, capsys):
    bad = tmp_path / "bad\nname.safetensors"
    bad.write_bytes(b"junk")
    assert main(["predict", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad\\nname.safetensors" in err and err.startswith("mobilenet predict: error:")


def test_mobilenets_own_warnings_are_one_line_and_others_keep_pythons_format(tmp_path, capsys, monkeypatch):
    """A model name where a checkpoint belongs warns (its weights are random) in one line, not as Python's file,
    line and source; a warning from another library is left as Python prints it."""
    import warnings

    data = tmp_path / "data" / "cat"
    data.mkdir(parents=True)  # no images: the command stops after the warning
    for _ in range(2):  # every command warns, not only the first one of a process
        assert main(["eval", "mobilenet_v1_0.25_128", "--data", str(tmp_path / "data")]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith("mobilenet eval: warning: mobilenet_v1_0.25_128 is a model name, not a checkpoint")
        assert len(err) == 2 and err[1].startswith("mobilenet eval: error:")

    def handler(args: argparse.Namespace) -> int:
        warnings.warn("from elsewhere", UserWarning, stacklevel=1)  # this file is not mobilenet's package
        return 0

    parser = build_parser()
    monkeypatch.setattr("mobilenet.cli.build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(command="models", handler=handler))
    with warnings.catch_warnings(record=True) as caught:  # what Python's own handling receives
        warnings.simplefilter("always")
        assert main(["models"]) == 0
        assert warnings.showwarning is warnings._showwarning_orig  # restored after the command
    assert [str(w.message) for w in caught] == ["from elsewhere"] and caught[0].filename == __file__
    assert "mobilenet models: warning" not in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", [["models"], ["cost", "mobilenet_v1_0.25_128", "--format", "json"]])
def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback(argv):
    """`mobilenet models > /dev/full`: the write fails with ENOSPC (in print for a long listing, at the final flush
    for a short one); it was an OSError traceback with exit code 1."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        process = subprocess.run(
            [sys.executable, "-m", "mobilenet", *argv], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    assert process.returncode == 2, process.stderr
    lines = process.stderr.splitlines()
    assert lines == [f"mobilenet {argv[0]}: error: cannot write the output: No space left on device"], lines
