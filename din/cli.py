"""The ``din`` command: a small dispatcher over the subcommand modules in ``din.commands``.

Each module in ``din/commands/`` that defines ``register(subparsers)`` adds its
subcommands there and sets ``handler`` (a function of the parsed arguments
returning an exit code) with ``set_defaults``. Adding a module is all it takes
to add a subcommand.

Expected failures (a stack that cannot start, a bad topology, a missing
setting) print one line, plus a log tail where one helps, and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Iterator
from types import ModuleType

import din.commands

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def command_modules() -> Iterator[ModuleType]:
    """The ``din.commands`` modules that register subcommands, by name."""
    for info in sorted(pkgutil.iter_modules(din.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"din.commands.{info.name}")
        if callable(getattr(module, "register", None)):
            yield module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="din", description="DIN, a Distributed Inference Network: run it, use it, measure it."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        module.register(subparsers)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from din.shared.naming import InvalidNameError
    from din.shared.topology import TopologyError
    from din.stack.processes import StackError

    return StackError, TopologyError, InvalidNameError, ValidationError


def describe_error(exc: BaseException) -> str:
    """One line for ``exc`` (plus the log tail a ``StackError`` carries)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or exc.title}: {err['msg']}" for err in exc.errors()
        ]
        return f"invalid settings for {exc.title}: " + "; ".join(problems)
    return str(exc).strip() or exc.__class__.__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``din`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except KeyboardInterrupt:
        print("din: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _expected_errors() as exc:
        print(f"din: error: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
