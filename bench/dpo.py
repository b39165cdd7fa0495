"""Case ``dpo`` of bench/run.py: one DPO epoch end to end, lorafit's trainer against TRL's
DPOTrainer with PEFT, on the same model, tokenizer, pairs and hyperparameters.

The pairs are ../shared/data/preference/dpo_en_demo.jsonl (TRL's conversational format): the
first ``dpo_train`` for training, the last ``dpo_eval`` held out. A byte-level BPE tokenizer is
trained on their texts; the model is the tiny Llama of the ``sft_model`` size with random weights.
LoRA r=16, alpha=32 on every linear layer, no dropout; DPO ``sigmoid`` with β = 0.1, the reference
the base model (the adapter disabled, on both sides: TRL's default with a PEFT model); batch 8,
lr 1e-4 with 3 warmup steps and cosine decay, max length 512 (pairs whose prompt alone is longer
are dropped by both), one epoch, fp32. TRL runs without gradient checkpointing (its default is
on, for every decoder block: less memory, more time), lorafit with ``model.gradient_checkpointing:
mlp`` (only the MLPs' activations are recomputed); both compute reference log-probs on the fly
(`train.precompute_reference` off; see the README for the comparison of the two).

Each side does the whole job inside the timer: load model and tokenizer, tokenize, train one
epoch, save the adapter. The held-out reward accuracy and margin are computed after the timer by
one evaluator for both (`lorafit.train.preference.evaluate_pairs` on lorafit's tokenization of the
held-out pairs, each side's adapter loaded with `lorafit.load`); with 44 pairs they are noisy.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "preference" / "dpo_en_demo.jsonl"
HYPER = dict(r=16, alpha=32, batch=8, lr=1e-4, warmup=3, max_length=512, beta=0.1)


def prepare(tmp: Path, s: dict, shape: dict) -> Path | None:
    """Write the train/held-out pairs (counts from size `s`) and the model directory both sides
    load (weights of model size `shape`, and the tokenizer) under `tmp`; None without the data."""
    from lorafit.testing import tiny_causal_lm_dir

    if not DATA.is_file():
        return None
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    workdir = tmp / "dpo"
    workdir.mkdir()
    for name, part in (("train.jsonl", rows[: s["dpo_train"]]), ("eval.jsonl", rows[len(rows) - s["dpo_eval"]:])):
        (workdir / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    texts = [m["content"] for r in rows for key in ("prompt", "chosen", "rejected") for m in r[key]]
    tiny_causal_lm_dir(workdir / "model", texts, vocab_size=shape["vocab"], hidden=shape["hidden"],
                       layers=shape["layers"], heads=shape["heads"], intermediate=shape["intermediate"], seed=0)
    return workdir


def run(side: str, workdir: Path) -> dict[str, Any]:
    """Train with `side` ("peft": TRL + PEFT, or "lorafit"), timed; then the shared held-out figures."""
    out = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=workdir))
    started = time.perf_counter()
    steps, adapter = (_train_trl if side == "peft" else _train_lorafit)(workdir, out)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "steps": steps, **held_out(workdir, adapter)}


def _train_lorafit(workdir: Path, out: Path) -> tuple[int, Path]:
    from lorafit.train import run_config, train

    summary = train(run_config({
        "model": {"name_or_path": str(workdir / "model"), "dtype": "fp32", "gradient_checkpointing": "mlp"},
        "lora": {"r": HYPER["r"], "lora_alpha": HYPER["alpha"], "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train_file": str(workdir / "train.jsonl"), "format": "preference",
                 "max_length": HYPER["max_length"], "on_bad_record": "skip"},
        "train": {"objective": "dpo", "beta": HYPER["beta"], "epochs": 1, "batch_size": HYPER["batch"],
                  "lr": HYPER["lr"], "scheduler": "cosine", "warmup_steps": HYPER["warmup"]},
        "output": {"dir": str(out / "run"), "plot": False},
    }))
    return summary["steps"], out / "run" / "adapter"


def _train_trl(workdir: Path, out: Path) -> tuple[int, Path]:
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=HYPER["batch"], learning_rate=HYPER["lr"],
        lr_scheduler_type="cosine", warmup_steps=HYPER["warmup"], num_train_epochs=1, max_length=HYPER["max_length"],
        beta=HYPER["beta"], loss_type=["sigmoid"], bf16=False, fp16=False, gradient_checkpointing=False,
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    lora = peft.LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in (workdir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                         train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return trainer.state.global_step, out / "adapter"


def held_out(workdir: Path, adapter: Path) -> dict[str, float]:
    """Reward accuracy and margin of `adapter` on the held-out pairs against the base model."""
    import lorafit
    import torch
    from lorafit.data import DataConfig, load_dataset_splits
    from lorafit.train.preference import PreferenceObjective, evaluate_pairs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    cfg = DataConfig(train_file=str(workdir / "eval.jsonl"), format="preference", max_length=HYPER["max_length"],
                     on_bad_record="skip")
    pairs = load_dataset_splits(cfg, tokenizer)[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = lorafit.load(AutoModelForCausalLM.from_pretrained(workdir / "model").to(device), adapter)
    figures = evaluate_pairs(PreferenceObjective("dpo", HYPER["beta"]), model, pairs, HYPER["batch"], device,
                             torch.float32)
    return {"reward_accuracy": figures["rewards/accuracies"], "reward_margin": figures["rewards/margins"],
            "held_out_pairs": len(pairs)}
