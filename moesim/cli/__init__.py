"""The ``moesim`` command line.

Each subcommand lives in its own module ``moesim/cli/cmd_<name>.py`` exposing ``ORDER`` (position in
``--help``) and ``register(subparsers)``; handlers set ``func`` and import heavy things (simpy, torch) only
when they run, so ``moesim --help`` and ``moesim replay`` never import torch.
Every user-facing error is a :class:`moesim.errors.MoesimError`: printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from moesim import __version__
from moesim.errors import MoesimError

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (naming the command and the flag), exit 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("moesim").strip()
        self.exit(EXIT_USAGE, f"moesim: error: {command + ': ' if command else ''}{message} "
                              f"(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="moesim",
        description="Expert-parallel MoE inference: routing traces, expert placement, cluster simulation, "
                    "and a live torch.distributed runtime.",
        epilog="Run 'moesim COMMAND --help' for a command's options. Set MOESIM_DEBUG=1 for tracebacks.")
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("cmd_"):
            modules.append(importlib.import_module(f"{__name__}.{info.name}"))
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad flag: one line and SystemExit(2) (OneLineParser.error)
    try:
        result = args.func(args)
    except MoesimError as exc:
        if os.environ.get("MOESIM_DEBUG"):
            raise
        print(f"moesim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        if os.environ.get("MOESIM_DEBUG"):
            raise
        name = f" {exc.filename}" if exc.filename else ""
        print(f"moesim: error: {exc.strerror or exc}{':' if name else ''}{name}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        if os.environ.get("MOESIM_DEBUG"):
            raise
        print("moesim: error: ran out of memory: the request is too large for this machine (lower the sizes asked "
              "for, or MOESIM_MEMORY_BUDGET)", file=sys.stderr)
        return EXIT_USAGE
    except RecursionError:
        if os.environ.get("MOESIM_DEBUG"):
            raise
        print("moesim: error: an input is nested too deeply to read", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("moesim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 0
    return int(result or 0)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
