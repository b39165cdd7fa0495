"""Training: ``lorafit train`` / ``eval`` / ``generate`` and the library calls behind them.

    from lorafit.train import load_run_config, train, resume
    summary = train(load_run_config("examples/sst2.yaml", ["train.max_steps=100"]))
    resume("runs/sst2")                                   # after an interruption

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``checkpoints/step-N/``
(see `checkpoints`), ``adapter/`` (PEFT-format adapter files), ``summary.json`` and ``loss.png``.
"""

from .config import ModelConfig, OutputConfig, RunConfig, TrainConfig, load_run_config, run_config
from .evaluation import evaluate, evaluate_config
from .trainer import TrainingInterrupted, resume, train

__all__ = ["ModelConfig", "OutputConfig", "RunConfig", "TrainConfig", "load_run_config", "run_config",
           "evaluate", "evaluate_config", "resume", "train", "TrainingInterrupted"]
