"""``lorafit train CONFIG.yaml [key=value ...]`` and ``lorafit train --resume RUN_DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...errors import ConfigError
from ..config import config_reference, format_reference
from . import HelpFormatter


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA adapter from a YAML config (or resume a stopped run)",
        description="Fine-tune a LoRA adapter. The YAML config has the sections model, lora, data, "
                    "train and output; KEY=VALUE arguments override its fields by dotted name "
                    "(train.lr=2e-4 lora.r=16). Relative paths are relative to the current directory. "
                    "RUN_DIR (output.dir) receives config.yaml, metrics.jsonl, checkpoints/step-N/, "
                    "adapter/, summary.json and loss.png.",
        epilog="config fields (KEY=DEFAULT):\n" + format_reference(config_reference()),
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", nargs="?", type=Path, metavar="CONFIG.yaml", help="the run's config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=2e-4")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint, with its saved config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_run_config
    from ..trainer import resume, train

    if args.resume is not None:
        if args.config is not None or args.overrides:
            raise ConfigError("--resume RUN_DIR takes no config or overrides: a resumed run keeps its "
                              "saved config (RUN_DIR/config.yaml) so that it ends as it would have")
        resume(args.resume)
        return 0
    if args.config is None:
        raise ConfigError("give a CONFIG.yaml to train, or --resume RUN_DIR")
    train(load_run_config(args.config, args.overrides))
    return 0
