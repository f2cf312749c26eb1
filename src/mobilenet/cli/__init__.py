"""The command line: argument parsing and printing only; every subcommand calls one Python API function.

Each subcommand lives in its own module here, exposing ``register(subparsers)``; the module imports heavy
libraries (torch) inside its handler, so ``mobilenet cost`` never pays for them. A :class:`MobileNetError`
(a user's mistake) becomes a one-line message on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from mobilenet import __version__
from mobilenet.errors import NO_ROOM_ERRNOS, MobileNetError

#: Subcommand modules, in the order ``mobilenet --help`` lists them. A module that is missing is skipped, so a
#: command can be developed without breaking the others.
COMMANDS = (
    "models",
    "cost",
    "demo",
    "train",
    "eval",
    "predict",
    "convert",
    "export",
    "quantize",
    "compress",
    "bench",
    "select",
    "reproduce",
)
#: Commands that run models: they start with glibc's allocator tuned (:func:`mobilenet.runtime.tune_allocator`;
#: MOBILENET_NO_MALLOC_TUNING=1 opts out), which removes most page faults of eager PyTorch at large activations.
MODEL_COMMANDS = ("demo", "train", "eval", "predict", "compress", "bench", "select", "reproduce")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, True, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # one line and exit 2, as argparse does, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="mobilenet", description="MobileNet V1/V2: models, costs, training and deployment.")
    parser.add_argument("--version", action="version", version=f"mobilenet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for command in COMMANDS:
        try:
            module = importlib.import_module(f"mobilenet.cli.{command}_cmd")
        except ModuleNotFoundError as error:
            if error.name == f"mobilenet.cli.{command}_cmd":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if sys.stderr is None:  # started with 2>&-: messages go nowhere (print(file=None) would put them on stdout)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the process's stderr, open until it exits
    if sys.stdout is None:  # started with >&-: every command prints; refuse before any work rather than crash after
        print(
            "mobilenet: error: stdout is closed; expected an open standard output (>/dev/null to discard it)",
            file=sys.stderr,
        )
        return 2
    _escape_unencodable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if args.command in MODEL_COMMANDS:
        from mobilenet.runtime import tune_allocator

        tune_allocator()
    try:
        with _one_line_warnings(args.command), _terminate_as_interrupt():
            code = int(args.handler(args) or 0)
            sys.stdout.flush()  # a full disk is reported here, not as Python's complaint at exit
            return code
    except MobileNetError as error:
        print(f"mobilenet {args.command}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobilenet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`mobilenet models | head`): nothing more to say; keep Python from complaining
        # about the unflushed stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            # Any path of any command (an input Path.exists() stats, an output): the system's limit, not a bug.
            print(f"mobilenet {args.command}: error: {_name_too_long(error)}", file=sys.stderr)
            return 2
        if error.errno not in _WRITE_ERRNOS:
            raise
        # stdout is a full disk or a device that takes nothing (`> /dev/full`): say so once, drop what is left.
        print(f"mobilenet {args.command}: error: cannot write the output: {error.strerror}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2


def _escape_unencodable_output() -> None:
    """Let stdout escape what its encoding cannot write (``\\xe9``), as Python's stderr already does: under
    PYTHONIOENCODING=ascii or a non-UTF-8 locale, a file or class name such as 'é' in a table or a 'wrote PATH'
    line was a UnicodeEncodeError traceback, after the work was done; so was, in UTF-8, a name that is not valid
    UTF-8 bytes (Python holds b'\\xff' as the lone surrogate '\\udcff', which no strict encoder writes)."""
    stream = sys.stdout
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None and getattr(stream, "errors", None) == "strict":
        with contextlib.suppress(ValueError, OSError):
            reconfigure(errors="backslashreplace")


#: Errors of a write that failed for want of room or a working device: an output that cannot be written, not a bug.
_WRITE_ERRNOS = NO_ROOM_ERRNOS | {errno.EIO}


def _name_too_long(error: OSError) -> str:
    """The one line for a path the system refuses as too long (ENAMETOOLONG), naming it and the limits."""
    name = error.filename if error.filename is not None else "a path"
    shown = shown_path(name)
    if len(shown) > 120:  # the path itself can be kilobytes: its start and end say which one it is
        shown = f"{shown[:60]}...{shown[-40:]} ({len(os.fsencode(str(name))):,} bytes)"
    return (
        f"{shown}: {error.strerror or 'File name too long'}; expected a path whose every name is at most 255 bytes "
        "and whose whole is at most 4096 bytes"
    )


def shown_path(path: object) -> str:
    """``path`` as a success line names it: as it is, or quoted with its control characters escaped (Python's
    repr) when it holds any, since a newline in an --out or --plot path would split the line in two."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _one_line(text: str) -> str:
    """``text`` on one line: a path may hold a newline, and a message on stderr is one line per problem."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler, a container stop) stops a command as Ctrl-C does: a KeyboardInterrupt,
    so an output being written is removed (atomic writes clean up on it) and the command says 'interrupted', exit
    130, as ``train`` does for both signals. Python's default let SIGTERM kill the process outright, leaving the
    temporary file of an interrupted write beside its output. Only where SIGTERM still has its default handling
    (an embedding program's own handler is kept), and the previous handling is restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Warnings that mobilenet's own code raises (a model name used where trained weights belong, ...) printed as
    one line, ``mobilenet COMMAND: warning: ...``, every time (not once per place, so a second command in one
    process warns too), instead of Python's file, line number and source line; warnings from other libraries keep
    Python's handling."""
    package = str(Path(__file__).resolve().parent.parent) + os.sep
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.filterwarnings("always", module=r"mobilenet(\.|$)")
        original = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if not str(filename).startswith(package):
                original(message, category, filename, lineno, file, line)
                return
            print(f"mobilenet {command}: warning: {_one_line(str(message))}", file=file or sys.stderr)

        warnings.showwarning = show
        yield
