"""What every ``lorafit`` subcommand shares: the extras it needs, dtype options, help layout,
and a quiet end when stdout's reader goes away. Not a command (it defines no ``register``)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import os
import sys
from typing import Callable

from ..dtypes import CHOICES, dtype_choice
from ..errors import ConfigError

# extra -> {distribution in pyproject's optional-dependencies: top-level module it installs}
EXTRAS: dict[str, dict[str, str]] = {
    "train": {"transformers": "transformers", "pyyaml": "yaml", "tqdm": "tqdm", "matplotlib": "matplotlib"},
    "quant": {"bitsandbytes": "bitsandbytes"},
    "serve": {"transformers": "transformers", "fastapi": "fastapi", "uvicorn": "uvicorn"},
    "export": {"transformers": "transformers", "gguf": "gguf"},
}
PICKLE_HELP = "read adapter_model.bin (pickle) with torch.load(weights_only=True); only for files you trust"
SIGPIPE_STATUS = 128 + 13  # what a shell reports for a process ended by SIGPIPE

Run = Callable[[argparse.Namespace], int]


def requires(extra: str | None) -> Callable[[Run], Run]:
    """Decorate a command's run function: it needs the optional dependencies of `extra` (None:
    the core only). Before it runs, every module of `extra` must be installed; while it runs, an
    import of an absent module of any extra ends it. Either way the command prints one line,
    ``lorafit CMD needs: pip install 'lorafit[EXTRA]' (missing: MODULE)``, and returns 1."""
    if extra is not None and extra not in EXTRAS:
        raise ValueError(f"requires({extra!r}): not an extra; expected one of {sorted(EXTRAS)} or None")

    def decorate(run: Run) -> Run:
        @functools.wraps(run)
        def checked(args: argparse.Namespace) -> int:
            needed = EXTRAS.get(extra, {}).values()
            absent = [module for module in needed if importlib.util.find_spec(module) is None]
            if absent:
                return missing_extra(args.command, extra, absent[0])
            try:
                return run(args)
            except ModuleNotFoundError as exc:
                module = (exc.name or "").partition(".")[0]
                owner = extra_of(module, prefer=extra)
                if owner is None or importlib.util.find_spec(module) is not None:
                    raise  # not an extra's module, or a broken install of one: the traceback helps
                return missing_extra(args.command, owner, module)

        return checked

    return decorate


def extra_of(module: str, prefer: str | None = None) -> str | None:
    """The extra that installs `module` (`prefer` when it is one of several), or None."""
    owners = [name for name, modules in EXTRAS.items() if module in modules.values()]
    return prefer if prefer in owners else next(iter(owners), None)


def missing_extra(command: str, extra: str, module: str) -> int:
    print(f"lorafit {command} needs: pip install 'lorafit[{extra}]' (missing: {module})", file=sys.stderr)
    return 1


def closed_pipe() -> int:
    """End a command whose stdout reader has gone (``lorafit inspect DIR --json | head``):
    stdout is pointed at /dev/null, so the interpreter's last flush cannot fail again, and the
    status is the one a shell gives a process ended by SIGPIPE."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # stdout is not a file descriptor (captured in-process): nothing will flush to the pipe
    return SIGPIPE_STATUS


def add_dtype_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--dtype`` with the shared spellings (`lorafit.dtypes`); the value is a short name or auto."""
    parser.add_argument("--dtype", default="auto", type=dtype_argument, metavar="{" + ",".join(CHOICES) + "}",
                        help=f"{help}; float32, bfloat16 and float16 are accepted too")


def dtype_argument(text: str) -> str:
    try:
        return dtype_choice(text, "--dtype")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Option defaults in the help; lines indented by two spaces (the config table) stay as written."""

    def _fill_text(self, text, width, indent):
        return "\n".join(line if line.startswith("  ") else super(HelpFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())
