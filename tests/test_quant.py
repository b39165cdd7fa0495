"""Quantised bases (bitsandbytes on CPU): quantize_model, LoRA on Linear4bit/Linear8bitLt,
QLoRA training, memory, exact merge by dequantising, in-place re-quantising merge with its
error report, merging an adapter trained on a quantised base into a full-precision base."""

import copy
import json

import pytest
import torch
from torch import nn

import lorafit
from lorafit import ConfigError, LoraConfig, MergeError
from lorafit import quant
from lorafit.kinds.linear import LoraLinear
from lorafit.kinds.quantized import QuantLoraLinear
from lorafit.layers import LoraLayer
from lorafit.testing import tiny_llama

import bitsandbytes as bnb  # noqa: E402  (a dev dependency: a missing anchor fails)

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [8, 64, 128, 300, 2, 19, 77, 400]])
ALL = dict(r=4, lora_alpha=8, target_modules="all-linear")


def randomise(model, std=0.05):
    """Non-zero adapters, standing in for trained ones."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for p in layer.lora.parameters():
                p.add_(std * torch.randn(p.shape, generator=gen))


def logits(model, train=False):
    """Train mode (no dropout in these models) runs bitsandbytes' dequantise-then-matmul path."""
    model.train(train)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("mode", quant.QUANT_MODES)
def test_quantize_model_replaces_linears_but_the_head(mode):
    model = quant.quantize_model(tiny_llama(), mode)
    attn = model.model.layers[0].self_attn
    expected = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(m, expected) for m in (attn.q_proj, attn.o_proj, model.model.layers[1].mlp.down_proj))
    assert type(model.lm_head) is nn.Linear
    x = torch.randn(3, 64)
    layer = attn.q_proj.train()
    with torch.no_grad():  # the layer computes with exactly the dequantised weight
        assert (layer(x) - x @ quant.dequantize_weight(layer).T).abs().max() <= 1e-5
    assert quant.describe_quantization(model)["mode"] == mode
    assert quant.describe_quantization(tiny_llama()) is None


def test_wrap_puts_fp32_adapters_on_quantised_linears():
    model = lorafit.wrap(quant.quantize_model(tiny_llama(), "nf4", double_quant=True), LoraConfig(**ALL))
    layers = dict(model.lora_layers())
    assert len(layers) == 14 and "lm_head" not in layers  # all-linear: 7 per block, no head
    assert all(isinstance(layer, QuantLoraLinear) for layer in layers.values())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    with model.disable_adapter():
        base = logits(model)
    assert torch.equal(logits(model), base)  # B = 0 at init


def test_qlora_training_lowers_the_loss():
    model = lorafit.wrap(quant.quantize_model(tiny_llama(), "nf4", double_quant=True), LoraConfig(**ALL))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(p.requires_grad for p in model.model.parameters() if p.dtype == torch.uint8)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(25):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def test_base_memory_bytes():
    """A byte count, hence deterministic: nf4 with hidden 256 takes <= 0.3x of the fp32 model
    (embeddings, norms and the head stay fp32); adapters are not counted."""
    fp32 = tiny_llama(hidden=256)
    fp32_bytes = quant.base_memory_bytes(fp32)
    assert fp32_bytes == sum(p.numel() * 4 for p in fp32.parameters()) + sum(
        b.numel() * b.element_size() for b in fp32.buffers())
    nf4 = quant.quantize_model(copy.deepcopy(fp32), "nf4")
    nf4_bytes = quant.base_memory_bytes(nf4)
    assert nf4_bytes <= 0.3 * fp32_bytes, nf4_bytes / fp32_bytes
    dq_bytes = quant.base_memory_bytes(quant.quantize_model(copy.deepcopy(fp32), "nf4", double_quant=True))
    assert dq_bytes < nf4_bytes
    wrapped = lorafit.wrap(nf4, LoraConfig(**ALL))
    assert quant.base_memory_bytes(wrapped) == nf4_bytes
    # one layer by hand: 4-bit codes + one fp32 absmax per 64 weights + the 16-entry nf4 code table
    q = nf4.model.layers[0].self_attn.q_proj
    assert quant.base_memory_bytes(nn.Sequential(q)) == 256 * 256 // 2 + 256 * 256 // 64 * 4 + 16 * 4


@pytest.mark.parametrize("mode, dora", [("nf4", False), ("fp4", False), ("int8", False), ("nf4", True)])
def test_merge_and_unload_dequantize_is_exact(mode, dora):
    """The merged fp32 model computes what the quantised model with its adapter computed: both
    multiply by the same dequantised weights (plus ΔW), so they differ by fp32 rounding only
    (the order of additions), well under 1e-4 on logits of size ~1."""
    model = lorafit.wrap(quant.quantize_model(tiny_llama(), mode), LoraConfig(**ALL, use_dora=dora))
    randomise(model)
    expected = logits(model, train=True)
    merged = model.merge_and_unload(dequantize=True)
    assert not any(quant.is_quantized_linear(m) or isinstance(m, LoraLayer) for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert (logits(merged) - expected).abs().max() <= 1e-4


def test_dora_magnitude_on_a_quantised_base_is_the_dequantised_row_norm():
    model = lorafit.wrap(quant.quantize_model(tiny_llama(), "nf4"), LoraConfig(**ALL, use_dora=True))
    for _, layer in model.lora_layers():
        norms = quant.dequantize_weight(layer.base_layer).norm(dim=1)
        assert torch.allclose(layer.lora["default"].magnitude, norms, atol=1e-6)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_in_place_merge_requantises_and_reports_the_error(mode):
    model = lorafit.wrap(quant.quantize_model(tiny_llama(), mode), LoraConfig(**ALL))
    randomise(model)
    layer = model.model.model.layers[0].self_attn.q_proj
    exact = quant.dequantize_weight(layer.base_layer) + layer.lora["default"].delta().detach()
    with pytest.warns(UserWarning, match=rf"merging into a {mode} base re-quantises.*differs by up to"):
        model.merge()
    report = quant.requantization_report(model)
    assert len(report) == 14 and all(err > 0 for err in report.values())
    probe = torch.randn(quant.PROBE_ROWS, 64, generator=torch.Generator().manual_seed(0))
    by_hand = (probe @ (exact - quant.dequantize_weight(layer.base_layer)).T).abs().max()
    assert report["model.layers.0.self_attn.q_proj"] == pytest.approx(float(by_hand), rel=1e-5)
    assert isinstance(layer.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and layer.merged == ["default"]
    with pytest.warns(UserWarning, match="unmerging"):
        model.unmerge()


def test_safe_merge_leaves_a_quantised_base_untouched():
    model = lorafit.wrap(quant.quantize_model(tiny_llama(), "nf4"), LoraConfig(**ALL))
    layer = model.model.model.layers[0].self_attn.q_proj
    codes = layer.base_layer.weight.data.clone()
    with torch.no_grad():
        layer.lora["default"].B[0, 0] = float("inf")
    with pytest.raises(MergeError):
        model.merge(safe=True)
    with pytest.raises(MergeError):
        layer.merge(["default"], safe=True)
    assert torch.equal(layer.base_layer.weight.data, codes) and layer.merged == []


def test_merging_a_qlora_adapter_into_the_full_precision_base():
    """`prepare_merge_base` rounds the fp base through the quantiser recorded with the adapter, so
    the merged model reproduces the trained (quantised) one; merging into the unrounded base
    adds the whole quantisation error."""
    base = tiny_llama()
    full = copy.deepcopy(base)
    trained = lorafit.wrap(quant.quantize_model(base, "nf4", double_quant=True), LoraConfig(**ALL))
    randomise(trained)
    expected = logits(trained)
    record = json.loads(json.dumps(quant.describe_quantization(trained)))  # as stored in metadata
    assert record == {"mode": "nf4", "skip": ["lm_head"], "double_quant": True, "blocksize": 64,
                      "weight_dtype": "float32", "compute_dtype": "float32"}
    errors = {}
    for match in (True, False):
        model = lorafit.wrap(quant.prepare_merge_base(copy.deepcopy(full), record, match_training=match),
                             LoraConfig(**ALL))
        trained_layers = dict(trained.lora_layers())
        with torch.no_grad():
            for path, layer in model.lora_layers():
                layer.lora["default"].load_state_dict(trained_layers[path].lora["default"].state_dict())
        errors[match] = (logits(model.merge_and_unload()) - expected).abs().max().item()
    assert errors[True] <= 1e-4 and errors[False] > 100 * errors[True], errors
    assert quant.prepare_merge_base(full, None) is full


def test_a_model_quantised_by_transformers_can_be_wrapped_and_merged(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    model = lorafit.wrap(loaded, LoraConfig(**ALL))
    assert all(isinstance(layer, QuantLoraLinear) for _, layer in model.lora_layers())
    assert quant.describe_quantization(model)["double_quant"] is True
    randomise(model)
    expected = logits(model, train=True)
    assert (logits(model.merge_and_unload(dequantize=True)) - expected).abs().max() <= 1e-4


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="needs the AVX512-BF16 CPU kernel")
def test_dequantise_reads_the_cpu_inference_packing():
    """bitsandbytes repacks a 4-bit weight (bf16 block scales) on the first no-grad eval forward
    on AVX512-BF16 CPUs; dequantising must read that layout too."""
    layer = quant.quantize_model(nn.Sequential(nn.Linear(64, 96)), "nf4", double_quant=True)[0]
    layer.support_avx512bf16_for_cpu = True  # what transformers-quantised models have
    before = quant.dequantize_weight(layer)
    with torch.no_grad():
        layer.eval()(torch.randn(2, 64))
    assert layer.weight.quant_state.packing_format_for_cpu
    after = quant.dequantize_weight(layer)
    assert (after - before).abs().max() <= before.abs().max() * 2 ** -8  # bf16 scale rounding only
    assert layer.weight.quant_state.packing_format_for_cpu  # the layer itself was left packed


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_svd_inits_on_a_quantised_base_are_refused(init):
    model = quant.quantize_model(tiny_llama(), "nf4")
    with pytest.raises(ConfigError, match=rf"'{init}' cannot apply to 'model.layers.0.self_attn.q_proj' "
                                          r"\(Linear4bit\): the base is quantised"):
        lorafit.wrap(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=init))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_quantisation_refusals():
    with pytest.raises(ConfigError, match="quantize mode 'nf3' is invalid"):
        quant.quantize_model(tiny_llama(), "nf3")
    wrapped = lorafit.wrap(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="quantise the base before wrap"):
        quant.quantize_model(wrapped, "nf4")
    with pytest.raises(ConfigError, match="weight_dtype = 'float33'"):
        quant.prepare_merge_base(tiny_llama(), {"mode": "nf4", "weight_dtype": "float33"})


def test_dequantize_model_keeps_adapters_and_state():
    model = lorafit.wrap(quant.quantize_model(tiny_llama(), "fp4"), LoraConfig(**ALL))
    randomise(model)
    expected = logits(model, train=True)
    quant.dequantize_model(model.model)
    layer = model.model.model.layers[0].self_attn.q_proj
    assert type(layer) is LoraLinear and type(layer.base_layer) is nn.Linear and layer.active == ("default",)
    assert (logits(model) - expected).abs().max() <= 1e-4
