"""The CUDA path (run by ``make gpu-check`` on a GPU machine; skipped without CUDA).

Autocast (bf16, fp16) parity with PEFT on the device, QLoRA nf4 through bitsandbytes' CUDA
kernels, mixed batches, ``lorafit train`` and the serving engine on the device.
``LORAFIT_TEST_DEVICE=cpu`` runs the same tests on the CPU (a dry run of the script).
"""

import copy
import importlib.util
import os

import peft
import pytest
import torch

import lorafit
from lorafit.testing import tiny_causal_lm_dir, tiny_llama

DEVICE = torch.device(os.environ.get("LORAFIT_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]
IDS = torch.randint(3, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed here")


def paired(tmp_path, base=None, **kwargs):
    base = base if base is not None else tiny_llama(vocab_size=1024, hidden=256, intermediate=512)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, init_lora_weights=False, **kwargs))
    theirs.save_pretrained(tmp_path)
    ours = lorafit.load(base, tmp_path, trainable=True)
    return theirs.to(DEVICE), ours.to(DEVICE)


def relative(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kwargs", [dict(target_modules=TARGETS), dict(target_modules=["embed_tokens", "q_proj"]),
                                    dict(target_modules=TARGETS, use_dora=True)], ids=["linear", "embedding", "dora"])
def test_autocast_matches_peft(tmp_path, dtype, kwargs):
    theirs, ours = paired(tmp_path, **kwargs)
    ids = IDS.to(DEVICE)
    losses, grads = [], []
    for model in (theirs, ours):
        model.train()
        with torch.autocast(DEVICE.type, dtype=dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None).sqrt().item())
    assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0])
    assert abs(grads[1] - grads[0]) <= 5e-2 * grads[0]
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype):
        assert relative(ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits) <= 2e-2


def test_bf16_base_with_fp32_adapters_matches_peft(tmp_path):
    base = tiny_llama(vocab_size=1024, hidden=256, intermediate=512).to(torch.bfloat16)
    theirs, ours = paired(tmp_path, base=base, target_modules=TARGETS)
    ids = IDS.to(DEVICE)
    with torch.no_grad():
        got, want = ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits
    assert got.dtype == torch.bfloat16 and relative(got, want) <= 2e-2


def test_mixed_batch_equals_each_adapter_alone(tmp_path):
    _, ours = paired(tmp_path, target_modules=TARGETS)
    ours.add_adapter("b", lorafit.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    ours.to(DEVICE).eval()
    ids = IDS.to(DEVICE)
    names = ["b", None, "default", "b"]
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name is None:
                with ours.disable_adapter():
                    alone = ours(input_ids=ids[row:row + 1]).logits
            else:
                with ours.using_adapter(name):
                    alone = ours(input_ids=ids[row:row + 1]).logits
            assert relative(mixed[row], alone[0]) <= 1e-4


@needs("bitsandbytes")
def test_qlora_nf4_through_bitsandbytes_kernels_matches_peft(tmp_path):
    from lorafit.quant import quantize_model

    base = quantize_model(tiny_llama(vocab_size=1024, hidden=256, intermediate=512), "nf4",
                          compute_dtype=torch.bfloat16).to(DEVICE)
    theirs, ours = paired(tmp_path, base=base, target_modules=TARGETS)
    ids = IDS.to(DEVICE)
    losses = []
    for model in (theirs, ours):
        model.train()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            losses.append(model(input_ids=ids, labels=ids).loss)
        losses[-1].backward()
    assert abs(losses[1].item() - losses[0].item()) <= 2e-2 * abs(losses[0].item())


def test_lorafit_train_runs_on_the_device(tmp_path):
    from lorafit.train.config import run_config
    from lorafit.train.trainer import train

    model_dir = tiny_causal_lm_dir(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "low-rank adaptation step {i} trains two small matrices"}}\n'
                            for i in range(32)))
    cfg = run_config({
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "target_modules": "all-linear"},
        "data": {"train_file": str(data), "format": "text", "max_length": 32},
        "train": {"batch_size": 4, "max_steps": 4, "log_every": 2},
        "output": {"dir": str(tmp_path / "run")},
    })
    summary = train(cfg)
    assert summary["device"].startswith(DEVICE.type) and summary["steps"] == 4
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@needs("fastapi")
def test_serving_engine_generates_per_adapter_on_the_device(tmp_path):
    from lorafit.serve.launch import LaunchConfig, build_engine

    model_dir = tiny_causal_lm_dir(tmp_path / "base")
    adapters = tmp_path / "adapters"
    base = type(tiny_llama()).from_pretrained(model_dir)
    lorafit.wrap(base, lorafit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)).save_adapter(adapters / "a")
    engine, _ = build_engine(LaunchConfig(base=str(model_dir), adapters=adapters, device=DEVICE.type))
    assert next(engine.model.parameters()).device.type == DEVICE.type
