"""The ``lorafit`` command line: one subcommand per module, registered in `COMMANDS`.

Each entry names a module that defines ``register(subparsers)``, which adds its subparser and
sets ``func`` (called with the parsed arguments, returning an exit code). Modules are imported
only when needed, so ``lorafit --help`` stays fast and the core never imports training or serving.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LorafitError

# subcommand -> module that registers it
COMMANDS = {
    "serve": "lorafit.serve.cli",
    "inspect": "lorafit.adapter_cli",
    "merge": "lorafit.adapter_cli",
    "train": "lorafit.train.commands.train",
    "eval": "lorafit.train.commands.eval",
    "generate": "lorafit.train.commands.generate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit",
        description="LoRA fine-tuning: train, inspect, merge, evaluate, generate and serve adapters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LorafitError as exc:
        print(f"lorafit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
