"""Case ``sft`` of bench/run.py: end-to-end supervised fine-tuning, lorafit's trainer against TRL's
SFTTrainer with PEFT, on the same model, tokenizer, rows and hyperparameters.

The setup of /work/shared/BENCHMARKS.md: the Alpaca demo rows in chat form (user = instruction,
blank line, input; assistant = output), the loss on the assistant tokens only; a byte-level BPE
tokenizer trained on those rows; the tiny Llama of the ``default`` size with random weights; LoRA
r=16, alpha=32 on every linear layer, no dropout; batch 8, lr 2e-4 with 5 warmup steps and cosine
decay, max length 512, one epoch, fp32. Train rows: the first ``sft_train`` rows of the file;
eval rows: ``sft_eval`` rows from row 900.

Each side does the whole job inside the timer: load model and tokenizer, tokenize, train one epoch,
evaluate, save the adapter. TRL runs without packing and without gradient checkpointing (TRL turns
it on by default; lorafit does not checkpoint either). lorafit groups batches by length
(``data.group_by_length``): each step still takes 8 examples, so both sides take the same steps.

The eval loss compared is computed after the timer by one evaluator for both (`eval_loss`): mean
cross-entropy over the assistant tokens of the eval rows as lorafit's pipeline tokenizes them. The
TRL side checks that TRL's tokenization of the train rows gives the same tokens and loss mask
(``same_tokens``: the share of rows that agree).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.jsonl"
EVAL_START = 900
HYPER = dict(r=16, alpha=32, batch=8, lr=2e-4, warmup=5, max_length=512)


def prepare(tmp: Path, s: dict, shape: dict) -> Optional[Path]:
    """Write the train/eval rows (counts from size `s`) and the model directory both sides load
    (weights of model size `shape`, and the tokenizer), under `tmp`; None when the data file is
    absent."""
    from lorafit.testing import tiny_causal_lm_dir

    if not DATA.is_file():
        return None
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    workdir = tmp / "sft"
    workdir.mkdir()
    _write_jsonl(workdir / "train.jsonl", rows[: s["sft_train"]])
    _write_jsonl(workdir / "eval.jsonl", rows[EVAL_START: EVAL_START + s["sft_eval"]])
    texts = [f"{r['instruction']}\n\n{r['input']}\n{r['output']}" for r in rows]
    tiny_causal_lm_dir(workdir / "model", texts, vocab_size=shape["vocab"], hidden=shape["hidden"],
                       layers=shape["layers"], heads=shape["heads"], intermediate=shape["intermediate"], seed=0)
    return workdir


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def run(side: str, workdir: Path) -> dict[str, Any]:
    """Train with `side` ("peft": TRL + PEFT, or "lorafit"), timed; then the shared eval loss."""
    out = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=workdir))
    started = time.perf_counter()
    facts, trained = (_train_trl if side == "peft" else _train_lorafit)(workdir, out)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "eval_loss": eval_loss(trained(), _tokenized(workdir, "eval.jsonl")), **facts}


def _train_lorafit(workdir: Path, out: Path) -> tuple[dict, Callable[[], Any]]:
    import lorafit
    from lorafit.train import run_config, train
    from transformers import AutoModelForCausalLM

    cfg = run_config({
        "model": {"name_or_path": str(workdir / "model"), "dtype": "fp32"},
        "lora": {"r": HYPER["r"], "lora_alpha": HYPER["alpha"], "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train_file": str(workdir / "train.jsonl"), "eval_file": str(workdir / "eval.jsonl"),
                 "format": "instruction", "max_length": HYPER["max_length"], "group_by_length": True},
        "train": {"epochs": 1, "batch_size": HYPER["batch"], "lr": HYPER["lr"], "scheduler": "cosine",
                  "warmup_steps": HYPER["warmup"]},
        "output": {"dir": str(out / "run"), "plot": False},
    })
    summary = train(cfg)

    def trained():
        base = AutoModelForCausalLM.from_pretrained(workdir / "model")
        return lorafit.load(base.to(_device()), out / "run" / "adapter")

    return {"steps": summary["steps"], "own_eval_loss": summary["eval"]["loss"]}, trained


def _train_trl(workdir: Path, out: Path) -> tuple[dict, Callable[[], Any]]:
    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=HYPER["batch"], per_device_eval_batch_size=HYPER["batch"],
        learning_rate=HYPER["lr"], lr_scheduler_type="cosine", warmup_steps=HYPER["warmup"], num_train_epochs=1,
        max_length=HYPER["max_length"], bf16=False, fp16=False, packing=False, completion_only_loss=True,
        gradient_checkpointing=False, eval_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0)
    lora = peft.LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                         train_dataset=Dataset.from_list(_prompt_completion(workdir / "train.jsonl")),
                         eval_dataset=Dataset.from_list(_prompt_completion(workdir / "eval.jsonl")))
    trainer.train()
    own = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(out / "adapter"))
    facts = {"steps": trainer.state.global_step, "own_eval_loss": own,
             "same_tokens": _same_tokens(trainer.train_dataset, _tokenized(workdir, "train.jsonl").examples)}
    return facts, lambda: trainer.model


def _prompt_completion(path: Path) -> list[dict]:
    """TRL's conversational prompt-completion rows (its completion-only loss applies to these)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [{"prompt": [{"role": "user", "content": _user(r)}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows]


def _user(row: dict) -> str:
    extra = row.get("input") or ""
    return f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]


def _same_tokens(trl_rows: Any, ours: list[dict]) -> float:
    """Share of rows where TRL's input ids and labels (-100 off the completion) equal lorafit's."""
    agree = sum(row["input_ids"] == ex["input_ids"] and row["labels"] == ex["labels"]
                for row, ex in zip(trl_rows, ours))
    return agree / max(len(ours), len(trl_rows))


def _tokenized(workdir: Path, name: str) -> Any:
    """lorafit's tokenization of a rows file: a `TokenizedDataset` of input ids and labels
    (-100 off the assistant spans)."""
    from lorafit.data import DataConfig, load_dataset_splits
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    cfg = DataConfig(train_file=str(workdir / name), format="instruction", max_length=HYPER["max_length"])
    return load_dataset_splits(cfg, tokenizer)[0]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eval_loss(model: Any, dataset: Any, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (fp32) over the target tokens of a `TokenizedDataset`:
    position t's logits against ``labels[t+1]``, batches right-padded with an attention mask, the
    logits the model itself returns."""
    import torch
    import torch.nn.functional as F

    from lorafit.data import collate

    device = _device()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset.examples[start:start + batch_size], dataset.pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            targets = batch["labels"][:, 1:].to(device)
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="sum",
                                     ignore_index=-100).item()
            count += int((targets != -100).sum())
    return total / count
