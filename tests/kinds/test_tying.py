"""ensure_weight_tying with LoRA layers and modules_to_save on tied embeddings, against PEFT 0.21.2
and by hand (token rows: test_tokens.py)."""

import copy
import warnings

import pytest
import torch

import lorafit
from lorafit.adapter_files import AdapterFileWarning
from lorafit.adapter_files.report import describe_adapter, format_report
from lorafit.kinds.tying import TiedLoraWeights

import peft
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

IDS = torch.tensor([[1, 3, 5, 7], [5, 2, 3, 9]])
LORA = [["embed_tokens", "q_proj"], ["lm_head", "q_proj"], ".*(q_proj|lm_head)"]
SAVED = [["embed_tokens"], ["lm_head"]]
CASES = [dict(target_modules=t) for t in LORA] + [dict(target_modules=["q_proj"], modules_to_save=m) for m in SAVED]


def tiny(tie: bool = True):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=tie)).eval()


def config(cls, **kwargs):
    # a copy: PEFT appends the embedding to the caller's modules_to_save list
    return cls(r=2, init_lora_weights=False, ensure_weight_tying=True, **copy.deepcopy(kwargs))


def peft_model(base, kwargs):
    model = peft.get_peft_model(copy.deepcopy(base), config(peft.LoraConfig, **kwargs))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:  # aliased LoRA factors move with their embedding's
                param.add_(0.3 * torch.randn_like(param))
    return model


# the head's scaling comes from its own rank/alpha pattern entries, its factors from the embedding
PATTERNS = dict(target_modules=["embed_tokens", "q_proj"], lora_alpha=8, rank_pattern={"lm_head": 4},
                alpha_pattern={"lm_head": 32, "embed_tokens": 3})


@pytest.mark.parametrize("kwargs", CASES + [PATTERNS])
def test_files_and_logits_match_peft_both_ways(tmp_path, kwargs):
    base = tiny()
    reference = peft_model(base, kwargs)
    reference.save_pretrained(tmp_path / "peft")
    expected = reference(input_ids=IDS).logits
    assert (expected - base(input_ids=IDS).logits).abs().max() > 1e-2

    ours = lorafit.load(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
    ours.save_adapter(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    # PEFT also stores the untouched base embeddings when target_modules names "embed_tokens"
    assert set(saved) == {k for k in theirs if not k.endswith("base_layer.weight")}
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, theirs[key])
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(back(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", CASES)
def test_fresh_adapter_is_tied_and_peft_loads_it(tmp_path, kwargs):
    base = tiny()
    ours = lorafit.wrap(copy.deepcopy(base), config(lorafit.LoraConfig, **kwargs))
    inner = ours.model
    embed, head = inner.model.embed_tokens, inner.lm_head
    if "modules_to_save" in kwargs:
        assert head.modules_to_save["default"].weight is embed.modules_to_save["default"].weight
        expected = {"embed_tokens": ["embed_tokens"], "lm_head": ["model.embed_tokens"]}  # the head's entry leaves
        assert ours.peft_config["default"].modules_to_save == expected[kwargs["modules_to_save"][0]]
    else:
        e, h = embed.lora["default"], head.lora["default"]
        assert isinstance(h, TiedLoraWeights)
        assert h.A.data_ptr() == e.B.data_ptr() and h.B.data_ptr() == e.A.data_ptr()
        torch.testing.assert_close(h.delta(), e.delta().T)  # ΔH = s·A_eᵀ B_eᵀ = s·(B_e A_e)ᵀ = ΔE
        assert (h.delta() - e.scaling * (e.B @ e.A).T).abs().max() < 1e-6
    ours.save_adapter(tmp_path)
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(input_ids=IDS).logits, ours(input_ids=IDS).logits, atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterFileWarning)  # the fingerprint covers the same modules both ways
        again = lorafit.load(copy.deepcopy(base), tmp_path, strict=True)
    torch.testing.assert_close(again(input_ids=IDS).logits, ours(input_ids=IDS).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [CASES[0], CASES[3]])
def test_three_adamw_steps_match_peft(kwargs):
    """PEFT's tied head factors are parameters of their own aliasing the embedding's storage, so
    AdamW keeps two states and moves the storage twice per step; lorafit does the same."""
    base = tiny()
    reference = peft_model(base, kwargs)
    ours = lorafit.wrap(copy.deepcopy(base), config(lorafit.LoraConfig, **kwargs))
    state = reference.state_dict()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad and ".lm_head." not in name:  # the head's follow: tied
                param.copy_(state[peft_key(name)])
    start = {name: param.detach().clone() for name, param in ours.named_parameters()}
    torch.testing.assert_close(ours(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0)
    for model in (reference, ours):
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            optimizer.step()
    assert len([p for p in ours.parameters() if p.requires_grad]) == \
        len([p for p in reference.parameters() if p.requires_grad])
    theirs = reference.state_dict()
    moved = 0.0
    for name, param in ours.named_parameters():
        if param.requires_grad and ".lm_head." not in name:
            torch.testing.assert_close(param.detach(), theirs[peft_key(name)], rtol=1e-5, atol=1e-7)
            moved = max(moved, float((param - start[name]).abs().max()))
    assert moved > 1e-2


def peft_key(name: str) -> str:
    """PEFT's state-dict key of a lorafit parameter name (LoRA factors and modules_to_save copies)."""
    embedding = ".embed_tokens." in name
    for ours, theirs in ((".lora.default.A", "lora_embedding_A.default" if embedding else "lora_A.default.weight"),
                         (".lora.default.B", "lora_embedding_B.default" if embedding else "lora_B.default.weight")):
        if name.endswith(ours):
            name = name[: -len(ours)] + "." + theirs
    return "base_model." + name


def test_merge_keeps_the_weights_tied_and_unmerge_restores_them():
    base = tiny()
    ours = lorafit.wrap(base, config(lorafit.LoraConfig, target_modules=["lm_head", "q_proj"]))
    embed, head = ours.model.model.embed_tokens, ours.model.lm_head
    before = embed.base_layer.weight.detach().clone()
    unmerged = ours(input_ids=IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "merging unties it"
        ours.merge()
    assert head.base_layer.weight is embed.base_layer.weight
    delta = embed.lora["default"].delta().T  # ΔE, added once
    torch.testing.assert_close(embed.base_layer.weight, before + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    ours.unmerge()
    torch.testing.assert_close(embed.base_layer.weight, before, atol=1e-6, rtol=0)
    plain = ours.merge_and_unload()
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    torch.testing.assert_close(plain(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)


def test_tie_survives_deepcopy_and_dtype_conversion():
    ours = lorafit.wrap(tiny(), config(lorafit.LoraConfig, target_modules=["embed_tokens"]))
    for model in (copy.deepcopy(ours), ours.double()):
        e, h = model.model.model.embed_tokens.lora["default"], model.model.lm_head.lora["default"]
        assert h.A.data_ptr() == e.B.data_ptr() and h.B.data_ptr() == e.A.data_ptr()
        assert h.A.dtype == e.B.dtype


def test_warnings_as_peft():
    cases = [(False, dict(ensure_weight_tying=True), "no tied embeddings"),
             (True, dict(ensure_weight_tying=True), "neither target_modules nor modules_to_save"),
             (True, dict(target_modules=["embed_tokens"]), "ensure_weight_tying is not set")]
    for tie, kwargs, message in cases:
        kwargs = {"target_modules": ["q_proj"], **kwargs}
        with pytest.warns(UserWarning, match=message):
            lorafit.wrap(tiny(tie), lorafit.LoraConfig(r=2, **kwargs))


def test_inspect_shows_the_tie(tmp_path):
    for i, kwargs in enumerate([CASES[1], CASES[4]]):
        lorafit.wrap(tiny(), config(lorafit.LoraConfig, **kwargs)).save_adapter(tmp_path / str(i))
        report = describe_adapter(tmp_path / str(i))
        assert report["ok"], report["checks"]
        text = format_report(report)
        shared = "LoRA factors transposed" if i == 0 else "modules_to_save copy shared"
        assert f"lm_head = model.embed_tokens ({shared})" in text


def two_adapters(second: list[str]):
    """A tied adapter "t" on the embedding and its head, and a plain adapter "o" on `second`."""
    ours = lorafit.wrap(tiny(), config(lorafit.LoraConfig, target_modules=["embed_tokens"]), adapter_name="t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "o" on the tied embedding without ensure_weight_tying: PEFT's warning
        ours.add_adapter("o", lorafit.LoraConfig(r=2, init_lora_weights=False, target_modules=second))
    ours.set_adapter(["t", "o"])
    return ours


@pytest.mark.parametrize("second, steps, tied", [
    (["embed_tokens"], [["t", "o"]], False),  # the head gets t's update only: untie
    (["embed_tokens"], [["t"], ["o"]], False),
    (["embed_tokens"], [["o"], ["t"]], False),
    (["q_proj"], [["t", "o"]], True),  # the same updates on both: stay tied
])
def test_merging_unties_when_the_embedding_and_its_head_get_different_updates(second, steps, tied):
    ours = two_adapters(second)
    unmerged = ours(input_ids=IDS).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for names in steps:
            ours.merge(names)
    assert (ours.model.lm_head.base_layer.weight is ours.model.model.embed_tokens.base_layer.weight) == tied
    assert any("merging unties it" in str(w.message) for w in caught) != tied
    torch.testing.assert_close(ours(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)
    ours.unmerge()
    torch.testing.assert_close(ours(input_ids=IDS).logits, unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method, options", [("cat", {}), ("svd", dict(rank=4))])
def test_combining_tied_adapters_gives_a_tied_adapter(tmp_path, method, options):
    ours = two_adapters(["q_proj"])
    ours.add_adapter("t2", config(lorafit.LoraConfig, target_modules=["lm_head"]))
    ours.set_adapter(["t", "o", "t2"])
    expected = ours(input_ids=IDS).logits
    ours.combine({"t": 1.0, "o": 1.0, "t2": 1.0}, "c", method=method, **options)
    ours.set_adapter("c")
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)
    e, h = ours.model.model.embed_tokens.lora["c"], ours.model.lm_head.lora["c"]
    assert isinstance(h, TiedLoraWeights) and h.A.data_ptr() == e.B.data_ptr() and h.B.data_ptr() == e.A.data_ptr()
    assert ours.peft_config["c"].ensure_weight_tying
    ours.save_adapter(tmp_path / "c", adapter_names=["c"])
    report = describe_adapter(tmp_path / "c")
    assert report["ok"] and report["tying"] == ["lm_head = model.embed_tokens (LoRA factors transposed)"], report
    loaded = lorafit.load(tiny(), tmp_path / "c")
    assert isinstance(loaded.model.lm_head.lora["default"], TiedLoraWeights)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("second, where", [(["embed_tokens"], "has LoRA on 'model.embed_tokens' alone"),
                                           (["lm_head"], "has its own LoRA on 'lm_head'")])
def test_combining_a_tied_adapter_with_one_on_either_module_alone_is_refused(second, where):
    ours = two_adapters(second)
    with pytest.raises(lorafit.errors.AdapterError, match=f"adapter 'o' {where}"):
        ours.combine({"t": 1.0, "o": 1.0}, "c")
    assert "c" not in ours.peft_config and "c" not in ours.model.lm_head.lora
