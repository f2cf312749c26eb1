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
