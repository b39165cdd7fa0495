"""``lorafit eval CONFIG.yaml | RUN_DIR``: loss, perplexity or accuracy on the eval split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from .support import HelpFormatter, requires


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate an adapter (or the base model) on a config's eval split",
        description="Evaluate on the eval split of a config (data.eval_file or data.eval_fraction): "
                    "loss and perplexity for causal LMs, loss and accuracy for classifiers. With a "
                    "RUN_DIR, its saved config and its final adapter are used; with a CONFIG.yaml, "
                    "the --adapter given, or the base model without one. Prints one JSON object.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("target", type=Path, metavar="CONFIG.yaml|RUN_DIR", help="a config file or a run directory")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.max_eval_records=100")
    p.add_argument("--adapter", type=Path, metavar="DIR",
                   help="adapter directory to evaluate (default: RUN_DIR/adapter, or none for a config)")
    p.set_defaults(func=run)


@requires("train")
def run(args: argparse.Namespace) -> int:
    from ..train.config import load_run_config
    from ..train.evaluation import evaluate_config
    from ..train.trainer import CONFIG_FILE

    adapter = args.adapter
    if args.target.is_dir():
        if not (args.target / CONFIG_FILE).is_file():
            raise ConfigError(f"{args.target}: not a run directory (no {CONFIG_FILE})")
        cfg = load_run_config(args.target / CONFIG_FILE, args.overrides)
        adapter = adapter or args.target / "adapter"
    else:
        cfg = load_run_config(args.target, args.overrides)
    print(json.dumps(evaluate_config(cfg, adapter)))
    return 0
