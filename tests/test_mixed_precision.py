"""Mixed precision against PEFT 0.21.2 on the same weights: every layer kind under CPU autocast
(bf16, fp16) trains and evaluates (loss within 2e-2, adapter gradient norms within 5e-2, eval
logits within 2e-2 of the largest), and bf16 / fp16 bases with fp32 adapters return the base's
dtype. The linear projections are above the oneDNN threshold, so the fast paths are in play."""

import copy

import bitsandbytes  # noqa: F401  (a dev dependency: quantised bases below)
import peft
import pytest
import torch
from torch import nn

import lorafit
from lorafit.quant import quantize_model
from lorafit.testing import tiny_llama

IDS = torch.randint(3, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
LINEARS = ["q_proj", "v_proj", "down_proj"]


def llama():
    return tiny_llama(vocab_size=1024, hidden=256, intermediate=512)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=64, n_embd=256, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


class ConvNet(nn.Module):
    """Conv1d and Conv2d layers, with a loss like a Hugging Face model's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c2 = nn.Conv2d(3, 32, 3, padding=1)
        self.c1 = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, input_ids=None, labels=None, **_):
        x = torch.sin(input_ids[:, :48].float().reshape(2, 3, 4, 4)).repeat(1, 1, 4, 4).to(self.head.weight.dtype)
        h = torch.relu(self.c2(x)).flatten(2)  # (2, 32, 256)
        logits = self.head(torch.relu(self.c1(h)).mean(-1))
        loss = logits.float().pow(2).mean()
        return type("Out", (), {"loss": loss, "logits": logits})()


def nf4_llama():
    return quantize_model(llama(), "nf4", compute_dtype=torch.float32)


CASES = {
    "linear": (llama, dict(target_modules=LINEARS)),
    "conv1d_hf": (gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "embedding": (llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "conv": (ConvNet, dict(target_modules=["c1", "c2"])),
    "dora": (llama, dict(target_modules=LINEARS, use_dora=True)),
    "nf4": (nf4_llama, dict(target_modules=LINEARS)),
}


def paired(factory, kwargs, tmp_path):
    """(PEFT model, lorafit model) with the same random adapter, lorafit's loaded from PEFT's file."""
    base = factory()
    config = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, **kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.save_pretrained(tmp_path)
    return theirs, lorafit.load(base, tmp_path, trainable=True)


def grad_norms(ours, theirs):
    """{(module path, factor): (lorafit's grad norm, PEFT's)}."""
    found = {}
    for path, layer in ours.lora_layers():
        peft_layer = theirs.base_model.model.get_submodule(path)
        embedding = "default" in getattr(peft_layer, "lora_embedding_A", {})
        for name in ("A", "B"):
            theirs_p = (getattr(peft_layer, f"lora_embedding_{name}")["default"] if embedding
                        else getattr(peft_layer, f"lora_{name}")["default"].weight)
            found[path, name] = (layer.lora["default"].get_parameter(name).grad.norm().item(), theirs_p.grad.norm().item())
    return found


def relative(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_autocast_trains_and_evaluates_like_peft(case, dtype, tmp_path):
    theirs, ours = paired(*CASES[case], tmp_path)
    losses = []
    for model in (theirs, ours):
        model.train()
        with torch.autocast("cpu", dtype=dtype):
            out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        losses.append(out.loss.item())
    assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0])
    for key, (mine, peft_norm) in grad_norms(ours, theirs).items():
        assert abs(mine - peft_norm) <= 5e-2 * peft_norm + 1e-6, key
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        logits = [m.eval()(input_ids=IDS).logits for m in (theirs, ours)]
    assert relative(logits[1], logits[0]) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_batch_under_autocast_matches_peft(dtype, tmp_path):
    base = llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=LINEARS,
                                                                      init_lora_weights=False))
    theirs.add_adapter("b", peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = lorafit.load(base, tmp_path)
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    names = ["b", "default"]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        want = theirs.eval()(input_ids=IDS, adapter_names=names).logits
        got = ours(input_ids=IDS, adapter_names=names).logits
    assert relative(got, want) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["linear", "conv1d_hf", "embedding", "conv", "dora"])
def test_low_precision_base_with_fp32_adapters_returns_the_base_dtype(case, dtype, tmp_path):
    factory, kwargs = CASES[case]
    theirs, ours = paired(lambda: factory().to(dtype), kwargs, tmp_path)
    for _, layer in ours.lora_layers():
        assert layer.lora["default"].A.dtype == torch.float32
    outputs = {}

    def record(name):
        def hook(module, args, out):
            outputs[name] = out.dtype

        return hook

    for path, layer in ours.lora_layers():
        layer.register_forward_hook(record(path))
    with torch.no_grad():
        got = ours.eval()(input_ids=IDS).logits
        want = theirs.eval()(input_ids=IDS).logits
    assert outputs and set(outputs.values()) == {dtype}, outputs
    assert relative(got, want) <= 2e-2


def test_merge_forms_the_delta_in_fp32_and_rounds_once():
    base = llama().to(torch.bfloat16)
    model = lorafit.wrap(base, lorafit.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.model.model.layers[0].self_attn.q_proj
    w = layer.lora["default"]
    expected = (layer.base_layer.weight.float() + w.scaling * (w.B.float() @ w.A.float())).to(torch.bfloat16)
    model.merge()
    assert torch.equal(layer.base_layer.weight, expected)
