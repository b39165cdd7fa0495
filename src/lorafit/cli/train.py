"""``lorafit train CONFIG.yaml [key=value ...]`` and ``lorafit train --resume RUN_DIR``.

Under torchrun every process runs this command. Rank 0 reports errors; a process that stops
because rank 0 did (`RankZeroFailed`) exits 1 quietly. SIGINT / SIGTERM end the run with the
usual ``128 + signal`` status (130 / 143) once the checkpoint of the last step is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError
from ..train.config import config_reference, format_reference
from .support import HelpFormatter, requires


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA adapter from a YAML config (or resume a stopped run)",
        description="Fine-tune a LoRA adapter. The YAML config has the sections model, lora, data, "
                    "train and output; KEY=VALUE arguments override its fields by dotted name "
                    "(train.lr=2e-4 lora.r=16), with lists and mappings in YAML flow syntax "
                    "(lora.target_modules=[q_proj,v_proj] lora.rank_pattern={q_proj: 8}). Relative "
                    "paths are relative to the current directory. "
                    "RUN_DIR (output.dir) receives config.yaml, metrics.jsonl, checkpoints/step-N/, "
                    "adapter/, summary.json and loss.png. Launched by torchrun (torchrun "
                    "--nproc_per_node N -m lorafit train CONFIG.yaml), the processes train one run "
                    "together (train.distributed). Ctrl-C or SIGTERM saves the last step, then stops.",
        epilog="config fields (KEY=DEFAULT):\n" + format_reference(config_reference(full=False)),
        formatter_class=HelpFormatter,
    )
    p.add_argument("config", nargs="?", type=Path, metavar="CONFIG.yaml", help="the run's config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=2e-4")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its latest checkpoint, with its saved config")
    p.set_defaults(func=run)


@requires("train")
def run(args: argparse.Namespace) -> int:
    from ..train.config import load_run_config
    from ..train.distributed import RankZeroFailed, launch_environment
    from ..train.trainer import TrainingInterrupted, resume, train

    if args.resume is not None and (args.config is not None or args.overrides):
        raise ConfigError("--resume RUN_DIR takes no config or overrides: a resumed run keeps its "
                          "saved config (RUN_DIR/config.yaml) so that it ends as it would have")
    if args.resume is None and args.config is None:
        raise ConfigError("give a CONFIG.yaml to train, or --resume RUN_DIR")
    main = launch_environment()[0] == 0
    try:
        if args.resume is not None:
            resume(args.resume)
        else:
            train(load_run_config(args.config, args.overrides))
    except TrainingInterrupted as exc:
        if main:
            print(f"lorafit train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except RankZeroFailed:
        return 1
    return 0
