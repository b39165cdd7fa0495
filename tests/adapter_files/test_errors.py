"""Every problem with an adapter directory is an AdapterFileError naming the file (and the tensor
key), and a failed load leaves the model as it was."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafit
from lorafit import AdapterError, AdapterFileError
from lorafit.adapter_files import AdapterFileWarning, read_adapter_dir
from lorafit.layers import LoraLayer, ModulesToSave
from adapter_models import logits, perturb_trainable, small_llama, tiny_bert_cls

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def saved(tmp_path):
    """A lorafit adapter (r=4 on q_proj/v_proj of a tiny Llama) in tmp_path/ad."""
    model = lorafit.wrap(small_llama(), lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    model.save_adapter(tmp_path / "ad")
    return tmp_path / "ad"


def rewrite_tensors(directory, change):
    """Apply `change` to the tensor dict and save it PEFT-style (no lorafit checksum)."""
    tensors = load_file(directory / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})


def rewrite_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def load_error(directory, model=None, **kwargs) -> str:
    with pytest.raises(AdapterFileError) as info:
        lorafit.load(model or small_llama(), directory, **kwargs)
    return str(info.value)


def test_missing_directory(tmp_path):
    assert "no such adapter directory" in load_error(tmp_path / "nope")


def test_missing_config_names_the_file_and_the_subfolders(saved):
    shutil.copytree(saved, saved.parent / "both" / "b")
    rewrite_tensors(saved, lambda t: None)  # PEFT-style file: no config copy to recover from
    (saved / "adapter_config.json").unlink()
    message = load_error(saved)
    assert str(saved) in message and "missing adapter_config.json" in message
    assert "subfolders b" in load_error(saved.parent / "both")


def test_missing_weights(saved):
    (saved / "adapter_model.safetensors").unlink()
    assert "missing adapter_model.safetensors" in load_error(saved)


def test_bad_json(saved):
    (saved / "adapter_config.json").write_text('{"r": 4,, }')
    message = load_error(saved)
    assert "adapter_config.json: invalid JSON at line 1 column" in message


def test_unknown_peft_type(saved):
    rewrite_config(saved, peft_type="ADALORA")
    assert "peft_type 'ADALORA'" in load_error(saved)


def test_unsupported_features_are_refused_by_name(saved):
    rewrite_config(saved, use_qalora=True, kasa_config={"a": 1}, lora_bias=False)
    message = load_error(saved)
    assert "use_qalora = True" in message and "kasa_config = {'a': 1}" in message
    assert "lora_bias" not in message  # default values are harmless


def test_invalid_config_value_names_the_field(saved):
    rewrite_config(saved, lora_dropout=1.5)
    message = load_error(saved)
    assert "adapter_config.json" in message and "lora_dropout" in message


def test_tensor_for_an_untargeted_module(saved):
    extra = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"
    rewrite_tensors(saved, lambda t: t.update({extra: torch.zeros(4, 32)}))
    message = load_error(saved)
    assert f"tensor {extra!r} matches no module" in message and "target_modules=['q_proj', 'v_proj']" in message


def test_tensor_for_a_module_the_model_lacks(saved):
    extra = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    rewrite_tensors(saved, lambda t: t.update({extra: torch.zeros(4, 32)}))
    assert "'model.layers.7.self_attn.q_proj' is not a module of LlamaForCausalLM" in load_error(saved)


def test_missing_tensor(saved):
    rewrite_tensors(saved, lambda t: t.pop(f"{Q0}.lora_B.weight"))
    assert f"missing tensor '{Q0}.lora_B.weight'" in load_error(saved)


def test_shape_that_does_not_fit_the_module(saved):
    rewrite_tensors(saved, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(48, 4)}))
    message = load_error(saved)
    assert f"tensor '{Q0}.lora_B.weight' has shape (48, 4)" in message and "expected (32, 4)" in message


def test_rank_that_disagrees_with_the_config(saved):
    rewrite_config(saved, rank_pattern={"v_proj": 2})
    message = load_error(saved)
    assert "lora_A.weight' has rank 4, but adapter_config.json gives" in message
    assert "v_proj' rank 2 (from rank_pattern)" in message


def test_dora_tensor_without_use_dora(saved):
    rewrite_tensors(saved, lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.ones(32)}))
    message = load_error(saved)
    assert "is not part of a plain LoRA adapter" in message
    assert all(v.field in message for v in lorafit.registry.extensions().variants)


def test_truncated_safetensors(saved):
    weights = saved / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert f"{weights}: truncated or corrupt safetensors file" in load_error(saved)


def test_corrupt_bytes_fail_the_checksum(saved):
    weights = saved / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x40
    weights.write_bytes(bytes(data))
    assert "do not match the checksum recorded when it was saved" in load_error(saved)


def test_nan_in_weights(saved):
    def poison(tensors):
        tensors[f"{Q0}.lora_A.weight"][1, 2] = float("nan")

    rewrite_tensors(saved, poison)
    assert f"tensor '{Q0}.lora_A.weight' holds 1 NaN/Inf value" in load_error(saved)


def test_pickle_is_refused_unless_allowed(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    message = load_error(saved)
    assert "refusing to load a pickle file" in message and "safetensors.torch as st; st.save_file" in message
    model = lorafit.load(small_llama(), saved, allow_pickle=True)
    assert torch.equal(model.model.model.layers[0].self_attn.q_proj.lora["default"].A,
                       tensors[f"{Q0}.lora_A.weight"])


def test_pickle_with_code_is_refused_even_when_allowed(saved):
    (saved / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "f": print}, saved / "adapter_model.bin")
    assert "cannot be loaded with torch.load(weights_only=True)" in load_error(saved, allow_pickle=True)


def test_other_base_model_warns_or_fails_with_strict(saved):
    from lorafit.testing import tiny_llama

    other = tiny_llama(vocab_size=100, hidden=32, heads=2, seed=5)
    with pytest.warns(AdapterFileWarning, match="fingerprint does not match: the targeted base weights differ"):
        lorafit.load(other, saved)
    assert "fingerprint does not match" in load_error(saved, model=tiny_llama(vocab_size=100, hidden=32, heads=2,
                                                                              seed=5), strict=True)


def test_existing_name_needs_replace(saved):
    model = lorafit.load(small_llama(), saved)
    with pytest.raises(AdapterError, match="pass replace=True"):
        model.load_adapter(saved)


def test_dora_on_an_embedding_is_refused_before_loading(saved):
    rewrite_config(saved, use_dora=True, target_modules=["embed_tokens"])
    message = load_error(saved)
    assert "adapter_config.json" in message and "embed_tokens" in message and "DoRA" in message


def test_failed_load_leaves_a_plain_model_untouched(tmp_path):
    model = lorafit.wrap(tiny_bert_cls(), lorafit.LoraConfig(r=2, target_modules=["query"], bias="lora_only",
                                                             modules_to_save=["classifier"], task_type="SEQ_CLS"))
    model.save_adapter(tmp_path)
    # the bias is the last tensor checked: every LoRA factor before it passed
    bias = "base_model.model.bert.encoder.layer.1.attention.self.query.base_layer.bias"
    rewrite_tensors(tmp_path, lambda t: t.update({bias: torch.zeros(7)}))
    base = tiny_bert_cls()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    assert "has shape (7,), but bert.encoder.layer.1.attention.self.query.bias has shape (32,)" in load_error(
        tmp_path, model=base)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_failed_load_leaves_a_lora_model_untouched(saved):
    host = lorafit.wrap(small_llama(), lorafit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    perturb_trainable(host)
    before = {k: v.clone() for k, v in host.state_dict().items()}
    expected = logits(host)
    rewrite_tensors(saved, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    with pytest.raises(AdapterFileError, match="missing tensor"):
        host.load_adapter(saved, adapter_name="b")
    assert host.adapter_names == ["default"]
    assert host.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in host.state_dict().items())
    assert torch.equal(logits(host), expected)


def test_read_adapter_dir_accepts_the_file_path(saved):
    assert read_adapter_dir(saved / "adapter_config.json").path == saved


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_fingerprint_is_the_same_across_dtype_and_device(tmp_path, device):
    trained = lorafit.wrap(small_llama().to(device=device, dtype=torch.bfloat16),
                           lorafit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    trained.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterFileWarning)
        loaded = lorafit.load(small_llama(), tmp_path, strict=True)
    assert loaded.model.model.layers[0].self_attn.q_proj.lora["default"].A.dtype == torch.float32


def rewrite_keeping_metadata(directory, change, checksum):
    """Apply `change` to the tensors and rewrite the file with lorafit's metadata: the recorded
    checksum kept (`checksum="stale"`: an edit after saving) or recomputed ("fresh": a writer
    that saved the wrong tensor)."""
    from safetensors import safe_open

    from lorafit.adapter_files.reading import META_CHECKSUM, tensors_checksum
    from lorafit.adapter_files.tensorfile import write_safetensors

    file = directory / "adapter_model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {key: tensor.clone() for key, tensor in load_file(file).items()}  # not views of the file
    change(tensors)
    if checksum == "fresh":
        metadata[META_CHECKSUM] = tensors_checksum(tensors)
    write_safetensors(file, tensors, metadata)


def test_wrong_shape_edited_after_saving_is_corrupt_and_named(saved):
    rewrite_keeping_metadata(saved, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(48, 4)}), "stale")
    message = load_error(saved)
    assert "the file was changed after saving (corrupt)" in message
    assert f"tensor '{Q0}.lora_B.weight' has shape (48, 4), expected (32, 4)" in message
    assert "base weight (32, 32) recorded in the fingerprint" in message


def test_wrong_shape_saved_that_way_is_named_by_inspect_and_load(saved):
    from lorafit.adapter_files.report import describe_adapter

    rewrite_keeping_metadata(saved, lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 31)}), "fresh")
    report = describe_adapter(saved)
    failed = [text for ok, text in report["checks"] if not ok]
    assert not report["ok"] and len(failed) == 1
    assert failed[0].startswith(f"tensor '{Q0}.lora_A.weight' has shape (4, 31), expected (4, 32) (rank 4 from "
                                f"adapter_config.json, base weight (32, 32) recorded in the fingerprint)")
    assert failed[0].endswith("the file was saved this way: its checksum matches")
    message = load_error(saved)
    assert f"tensor '{Q0}.lora_A.weight' has shape (4, 31)" in message and "checksum" not in message


def test_inspect_checks_ranks_against_the_config_without_lorafit_metadata(saved):
    from lorafit.adapter_files.report import describe_adapter

    rewrite_tensors(saved, lambda t: None)  # PEFT-style: no checksum, no fingerprint
    assert describe_adapter(saved)["ok"]
    rewrite_config(saved, rank_pattern={"v_proj": 2})
    failed = [text for ok, text in describe_adapter(saved)["checks"] if not ok]
    v0 = "base_model.model.model.layers.0.self_attn.v_proj"
    assert f"tensor '{v0}.lora_A.weight' has shape (4, 32), expected (2, 32) (rank 2 from adapter_config.json)" \
           "; no checksum recorded" in failed
    assert len(failed) == 4  # A and B of v_proj in both layers


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_lora_tensor_is_refused_by_name_not_cast(saved, dtype):
    from lorafit.adapter_files.report import describe_adapter

    rewrite_tensors(saved, lambda t: t.update({f"{Q0}.lora_A.weight": t[f"{Q0}.lora_A.weight"].to(dtype)}))
    name = str(dtype).removeprefix("torch.")
    expected = f"tensor '{Q0}.lora_A.weight' has dtype {name}; LoRA tensors must be floating point"
    assert expected in load_error(saved)
    with pytest.raises(AdapterFileError, match=expected):
        describe_adapter(saved)
