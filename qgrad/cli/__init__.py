"""The ``qgrad`` command line: ``qgrad train``, ``qgrad sweep``, ``qgrad demo`` (also ``python -m qgrad``).

Exit codes: 0 on success, 2 for usage errors (reported by argparse), 1 for runtime errors. Expected runtime
errors (a missing data directory, an unreadable checkpoint, a run directory that already holds a run) print
one line ``qgrad COMMAND: error: ...``; ``--debug`` or the environment variable ``QGRAD_DEBUG=1`` print the
full traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import List, Optional

from qgrad.cli import demo, plot, sweep, train
from qgrad.malloc import keep_freed_memory
from qgrad.training import CHECKPOINT

__all__ = ["build_parser", "entry", "main"]

# Errors a user can cause and fix (paths, formats, settings); anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (OSError, ValueError, RuntimeError, ImportError)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record arrives (so later redirections still apply)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """Epoch lines of ``qgrad.training`` (and other ``qgrad`` loggers) go to stdout as plain messages."""
    log = logging.getLogger("qgrad")
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qgrad",
        description=(
            "Quantization-robust training with the gradient-l1 penalty (Alizadeh et al., ICLR 2020): "
            "train models with or without a gradient penalty, and measure their accuracy after post-training "
            "quantization."
        ),
        epilog="Run 'qgrad COMMAND --help' for the options of a command. Start with 'qgrad demo'.",
    )
    parser.add_argument("--debug", action="store_true", help="print full tracebacks for errors")
    debug_parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS keeps the subcommand's default from overwriting a --debug given before the command name.
    debug_parent.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print full tracebacks for errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, sweep, demo, plot):
        module.add_parser(sub, parents=[debug_parent])
    return parser


def warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings of the command line as one line each: ``RuntimeWarning: qgrad: ...``. Python's default adds
    the file and the source line that warned, which from inside qgrad or torch reads like a crash."""
    return f"{category.__name__}: {message}\n"


def entry() -> int:
    """The ``qgrad`` script: :func:`main` in a process whose CPU allocator keeps freed memory (see
    :mod:`qgrad.malloc`; a training step then does not page-fault its tensors back in) and whose warnings
    print as one line (:func:`warning_line`)."""
    keep_freed_memory()
    warnings.formatwarning = warning_line
    return main()


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("QGRAD_DEBUG", "") not in ("", "0")
    _setup_logging()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        hints = {
            "train": "; --resume continues from the last checkpoint",
            "demo": "; a demo does not resume: run it again with --overwrite to start over",
        }
        out = getattr(args, "out", None)
        if args.command == "train" and out is not None and not (Path(out) / CHECKPOINT).is_file():
            hints["train"] = "; no checkpoint was written yet: start the run again"
        print(f"qgrad {args.command}: interrupted{hints.get(args.command, '')}", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:
        if debug:
            traceback.print_exc()
        else:
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"qgrad {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1
