"""lorafit vs PEFT on a CUDA device, in one process: the bench half of ``make gpu-check``.

A random Llama shaped like a 1B model (hidden 2048, 16 layers, vocab 32000) in bf16, r16 on
every linear layer. Cases, each lorafit then PEFT on the same weights and batch:

* ``train_step``: forward + backward + AdamW step (seconds per step, median of 5 after 2 warm-ups)
  and the peak GPU memory of a step (``torch.cuda.max_memory_allocated``);
* ``unmerged``: an inference forward with one unmerged adapter, over the plain base's;
* ``mixed``: a mixed batch of 8 adapters (one per row) over one adapter (lorafit) and over PEFT's
  mixed batch;
* ``qlora``: the train step on an nf4 base (bitsandbytes; skipped with one line when absent).

Prints one JSON object (also written to --out). ``--device cpu --size tiny`` is a dry run of the
same code on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import peft
import torch

import lorafit
from lorafit.testing import tiny_llama

SIZES = {
    "1b": dict(vocab_size=32000, hidden=2048, layers=16, heads=16, intermediate=5632),
    "tiny": dict(vocab_size=512, hidden=64, layers=2, heads=4, intermediate=128),
}
TRAIN_BATCH, INFER_BATCH, SEQ = (4, 8, 512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_of(fn, device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device)


def models(base, device):
    """(lorafit model, PEFT model) with the same r16 all-linear adapter on copies of `base`."""
    config = dict(r=16, lora_alpha=32, target_modules="all-linear")
    ours = lorafit.wrap(copy.deepcopy(base), lorafit.LoraConfig(**config, init_lora_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    state = {f"base_model.model.{path}.lora_{k}.default.weight": getattr(layer.lora["default"], k)
             for path, layer in ours.lora_layers() for k in "AB"}
    theirs.load_state_dict({k: v.detach().to(torch.float32) for k, v in state.items()}, strict=False)
    return ours.to(device), theirs.to(device)


def train_step(model, ids, device, dtype):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(base, device, dtype, vocab):
    ids = torch.randint(0, vocab, (TRAIN_BATCH, SEQ), device=device)
    ours, theirs = models(base, device)
    result = {}
    for name, model in (("lorafit", ours), ("peft", theirs)):
        model.train()
        step = train_step(model, ids, device, dtype)
        result[name] = {"step_s": timed(step, device), "peak_bytes": peak_of(step, device)}
        del model
    result["time_ratio"] = result["lorafit"]["step_s"] / result["peft"]["step_s"]
    if device.type == "cuda":
        result["memory_ratio"] = result["lorafit"]["peak_bytes"] / result["peft"]["peak_bytes"]
    return result


def bench_inference(base, device, dtype, vocab):
    ids = torch.randint(0, vocab, (INFER_BATCH, SEQ // 4), device=device)
    ours, theirs = models(base, device)
    names = [f"a{i}" for i in range(INFER_BATCH)]
    for name in names:
        ours.add_adapter(name, lorafit.LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
        theirs.add_adapter(name, peft.LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    ours.to(device).eval()
    theirs.to(device).eval()

    def run(model, **kw):
        def forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                model(input_ids=ids, **kw)
        return forward

    def plain():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype), ours.disable_adapter():
            ours(input_ids=ids)

    base_s = timed(plain, device)
    one = timed(run(ours), device)
    mixed = timed(run(ours, adapter_names=names), device)
    peft_mixed = timed(run(theirs, adapter_names=names), device)
    return {"base_s": base_s, "unmerged_s": one, "mixed_s": mixed, "peft_mixed_s": peft_mixed,
            "unmerged_over_base": one / base_s, "mixed_over_one": mixed / one, "mixed_over_peft": mixed / peft_mixed}


def bench_qlora(size, device, vocab):
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed here (carry its wheel in .whl/, see make gpu-check)"}
    from lorafit.quant import quantize_model

    base = quantize_model(tiny_llama(**size), "nf4", compute_dtype=torch.bfloat16)
    return bench_train(base, device, torch.bfloat16, vocab)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu bench: no CUDA device here; nothing measured")
        return 0
    size = SIZES[args.size]
    base = tiny_llama(**size).to(torch.bfloat16)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "peft": peft.__version__, "size": args.size, "model": size,
        "train_step": bench_train(base, device, torch.bfloat16, size["vocab_size"]),
        "inference": bench_inference(base, device, torch.bfloat16, size["vocab_size"]),
        "qlora_nf4": bench_qlora(size, device, size["vocab_size"]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
