"""The ``lorafit`` command line: one module per subcommand in this package.

A module is a command when it defines ``register(subparsers)``, which adds its subparser and sets
``func`` (called with the parsed arguments, returning an exit code); `command_modules` finds them
by listing the package, so a new command is one new file. Registering imports no optional
dependency: each command imports its work inside its run function, decorated with
`support.requires`, which turns a missing extra into one line naming the install command.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from ..errors import LorafitError
from .support import closed_pipe


def command_modules() -> list[ModuleType]:
    """Every module of this package that defines ``register``, by name."""
    modules = (importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__))
    return [module for module in modules if hasattr(module, "register")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit",
        description="LoRA fine-tuning from the command line; `lorafit COMMAND --help` describes each command.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in command_modules():
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return status
    except BrokenPipeError:
        return closed_pipe()
    except LorafitError as exc:
        print(f"lorafit {args.command}: error: {exc}", file=sys.stderr)
        return 1

