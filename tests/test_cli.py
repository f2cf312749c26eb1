"""The command line as a whole: every option of every subcommand says what it does and what its default is."""

from __future__ import annotations

import argparse

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
