"""GGUF export without llama.cpp: the rope permutation against Hugging Face's rotary embedding,
the alpha folding against PEFT, tensor names and types, tokenizer keys, refusals, atomic writes."""

import copy
import errno
import math
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import peft
import pytest
import torch
from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import lorafit
from lorafit.atomic import is_temp_file
from lorafit.errors import ExportError
from lorafit.export import ARCHITECTURES, adapter_to_gguf, rope_permute, to_gguf
from lorafit.export.gguf import ADAPTER_ONLY_REFUSALS, llama3_rope_factors

from gguf_models import LORA, tiny_model, tokenizer_for, trained_adapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(tokenizer, base, adapter dir) for the tiny Llama with its byte-level BPE tokenizer."""
    directory = tmp_path_factory.mktemp("llama")
    tokenizer = tokenizer_for("llama", directory)
    base = tiny_model("llama", len(tokenizer) + 3)
    return tokenizer, base, trained_adapter(base, directory / "adapter")


def fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def tensor(reader, name) -> np.ndarray:
    """A GGUF tensor as float32 in PyTorch's [out, in] order (dequantised when quantised)."""
    found = next(t for t in reader.tensors if t.name == name)
    data = gguf.quants.dequantize(found.data, found.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(list(reversed([int(n) for n in found.shape])))


def test_rope_permute_turns_hf_rotation_into_interleaved_rotation():
    """rotate-half rope (HF's own code) then the permutation == the permutation then the
    adjacent-pair rope llama.cpp applies, for every head and position."""
    n_heads, d, positions = 3, 8, 5
    config = tiny_model("llama", 16).config
    config.head_dim = d
    rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(1, n_heads, positions, d)
    cos, sin = rotary(x, torch.arange(positions)[None])
    hf, _ = apply_rotary_pos_emb(x, x, cos, sin)

    theta = config.rope_parameters["rope_theta"] ** (-torch.arange(0, d, 2).double() / d)  # [d/2]
    angle = torch.arange(positions).double()[:, None] * theta  # [positions, d/2]
    rows = rope_permute(x[0].permute(0, 2, 1).reshape(n_heads * d, positions), n_heads)
    pairs = rows.reshape(n_heads, d // 2, 2, positions).double()  # adjacent pairs (2i, 2i+1)
    a, b = pairs[:, :, 0], pairs[:, :, 1]
    c, s = angle.T.cos(), angle.T.sin()
    interleaved = torch.stack([a * c - b * s, b * c + a * s], dim=2).reshape(n_heads * d, positions)

    expected = rope_permute(hf[0].permute(0, 2, 1).reshape(n_heads * d, positions), n_heads)
    torch.testing.assert_close(interleaved.float(), expected, atol=1e-5, rtol=1e-5)


def test_rope_permute_by_hand():
    """Head of 4 dims: rows (0, 1 | 2, 3) pair as (0, 2), (1, 3) in HF and become 0, 2, 1, 3."""
    rows = torch.arange(8.0)[:, None]
    assert rope_permute(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_llama3_rope_factors_are_hf_frequencies_over_the_scaled_ones(tmp_path):
    """rope_freqs holds f_i / f'_i with f'_i transformers' Llama 3.1 frequencies; all three bands
    (unscaled, scaled by 8, smoothed) occur."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = tiny_model("llama3", 32)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 10000.0 ** (-torch.arange(0, 16, 2).double() / 16)
    factors = llama3_rope_factors(model.config.rope_parameters, 16)
    torch.testing.assert_close(factors, (plain / scaled.double()).float())
    assert factors[0] == 1 and factors[-1] == 8 and ((factors > 1) & (factors < 8)).any()
    tokenizer = tokenizer_for("llama3", tmp_path)
    reader, meta = fields(to_gguf(tiny_model("llama3", len(tokenizer)), tmp_path / "m.gguf", tokenizer))
    np.testing.assert_array_equal(tensor(reader, "rope_freqs.weight"), factors.numpy())
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"


def test_merged_f32_tensors_are_the_merged_weights(llama, tmp_path):
    tokenizer, base, adapter = llama
    merged = lorafit.load(copy.deepcopy(base), adapter).merge_and_unload()
    out = to_gguf(merged, tmp_path / "m.gguf", tokenizer, outtype="f32")
    reader, meta = fields(out)
    attn = merged.model.layers[1].self_attn
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_q.weight"), rope_permute(attn.q_proj.weight, 4).numpy())
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_k.weight"), rope_permute(attn.k_proj.weight, 2).numpy())
    np.testing.assert_array_equal(tensor(reader, "blk.1.attn_v.weight"), attn.v_proj.weight.detach().numpy())
    np.testing.assert_array_equal(tensor(reader, "output.weight"), merged.lm_head.weight.detach().numpy())
    assert meta["general.architecture"] == "llama"
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.rope.dimension_count"] == 16
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32


def test_tensor_types_per_outtype(llama, tmp_path):
    tokenizer, base, _ = llama
    for outtype, expected in (("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")):
        reader, _ = fields(to_gguf(base, tmp_path / f"{outtype}.gguf", tokenizer, outtype=outtype, modelfile=False))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.ffn_down.weight"] == expected and types["blk.0.attn_norm.weight"] == "F32"
    q8 = tensor(reader, "blk.0.ffn_up.weight")
    weight = base.model.layers[0].mlp.up_proj.weight.detach().numpy()
    # q8_0: each block of 32 shares the step d = max|w|/127 (stored as f16, relative error 2^-11,
    # which moves a value of up to 127 d by 0.07 d), so the error is at most 0.5 d + 0.07 d
    step = np.abs(weight.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    error = np.abs(q8 - weight).reshape(-1, 32)
    assert np.all(error <= 0.57 * step) and error.max() > 0.3 * step.min()


def test_adapter_file_folds_scales_into_b_as_peft_computes_delta(llama, tmp_path):
    """llama.cpp adds (alpha / r) · lora_b · lora_a; with rank/alpha patterns and rsLoRA that must
    equal PEFT's ΔW for the same adapter directory (rope-permuted for q and k)."""
    _, base, adapter = llama
    out = adapter_to_gguf(lorafit.load(copy.deepcopy(base), adapter), tmp_path / "a.gguf")
    reader, meta = fields(out)
    alpha = meta["adapter.lora.alpha"]
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora" and alpha == LORA["lora_alpha"]
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))
    layer = reference.base_model.model.model.layers[0]
    for module, name, heads in ((layer.self_attn.q_proj, "attn_q", 4), (layer.self_attn.k_proj, "attn_k", 2),
                                (layer.mlp.down_proj, "ffn_down", None), (layer.mlp.up_proj, "ffn_up", None)):
        a, b = tensor(reader, f"blk.0.{name}.weight.lora_a"), tensor(reader, f"blk.0.{name}.weight.lora_b")
        delta = module.get_delta_weight("default").detach()
        expected = rope_permute(delta, heads) if heads else delta
        np.testing.assert_allclose(alpha / b.shape[1] * b @ a, expected.numpy(), atol=1e-6, rtol=1e-5)
    r_q, alpha_k = LORA["rank_pattern"]["q_proj"], LORA["alpha_pattern"]["k_proj"]
    assert tensor(reader, "blk.0.attn_q.weight.lora_a").shape == (r_q, 64)
    # rsLoRA k_proj: s = 3 / sqrt(4), folded into B by s · r / alpha = 1.5 · 4 / 8
    b_k = lorafit.load(copy.deepcopy(base), adapter).model.model.layers[0].self_attn.k_proj.lora["default"].B
    expected_b = rope_permute(b_k.detach() * (alpha_k / math.sqrt(4)) * 4 / alpha, 2)
    np.testing.assert_allclose(tensor(reader, "blk.0.attn_k.weight.lora_b"), expected_b.numpy(), rtol=1e-6)


def test_tokenizer_keys(llama, tmp_path):
    tokenizer, base, _ = llama
    _, meta = fields(to_gguf(base, tmp_path / "m.gguf", tokenizer, outtype="f16"))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == base.config.vocab_size and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    vocab = tokenizer.get_vocab()  # each merge of a byte-level BPE joins two tokens into a third
    merges = [m.split(" ") for m in meta["tokenizer.ggml.merges"]]
    assert merges and all(left in vocab and right in vocab and left + right in vocab for left, right in merges)


def test_modelfile(llama, tmp_path):
    tokenizer, base, _ = llama
    to_gguf(base, tmp_path / "tiny.gguf", tokenizer, outtype="f16")
    lines = (tmp_path / "Modelfile").read_text().splitlines()
    assert "FROM ./tiny.gguf" in lines and 'PARAMETER stop "<|eos|>"' in lines


def test_progress_lines_per_block(llama, tmp_path, capsys):
    tokenizer, base, _ = llama
    to_gguf(base, tmp_path / "m.gguf", tokenizer, outtype="f16", progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in lines] == ["token_embd", "blk.0", "blk.1", "output_norm", "output"]
    assert lines[-1].startswith("gguf: output done (5/5 groups,")


def test_full_disk_leaves_the_old_file_and_no_temporary(llama, tmp_path, monkeypatch):
    tokenizer, base, _ = llama
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    written = []

    def full_disk(self, data, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(data.nbytes)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk)
    with pytest.raises(OSError, match="No space"):
        to_gguf(base, out, tokenizer)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_crash_mid_write_leaves_the_old_file(tmp_path):
    """A process that dies while writing tensors (here: exits after the second one) leaves the
    previous file whole; only a temporary sibling remains."""
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import os, gguf
        from lorafit.export import to_gguf
        from lorafit.testing import build_tokenizer, tiny_llama
        written = []
        def dies(self, data, *args, **kwargs):
            if len(written) == 2:
                os._exit(3)
            written.append(self.fout[0].write(data.tobytes()))
        gguf.GGUFWriter.write_tensor_data = dies
        tokenizer = build_tokenizer()
        to_gguf(tiny_llama(vocab_size=len(tokenizer)), {str(out)!r}, tokenizer)
    """)
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 3
    assert out.read_bytes() == b"previous"
    left = [p for p in tmp_path.iterdir() if p != out]
    assert len(left) == 1 and is_temp_file(left[0]) and left[0].stat().st_size > 0


def test_unsupported_architecture_lists_the_supported_ones(llama, tmp_path):
    tokenizer = llama[0]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ExportError, match="'gpt2' has no GGUF mapping.*llama, mistral, qwen2"):
        to_gguf(gpt2, tmp_path / "m.gguf", tokenizer)
    assert sorted(ARCHITECTURES) == ["llama", "mistral", "qwen2"]
    assert not (tmp_path / "m.gguf").exists()


def test_unmerged_model_is_refused(llama, tmp_path):
    tokenizer, base, adapter = llama
    with pytest.raises(ExportError, match="merge_and_unload"):
        to_gguf(lorafit.load(copy.deepcopy(base), adapter), tmp_path / "m.gguf", tokenizer)


def test_wordpiece_tokenizer_is_refused(llama, tmp_path):
    from tokenizers import Tokenizer, models

    wordpiece = BertTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    with pytest.raises(ExportError, match="'WordPiece' is not supported"):
        to_gguf(llama[1], tmp_path / "m.gguf", wordpiece)


@pytest.mark.parametrize("field", sorted(ADAPTER_ONLY_REFUSALS))
def test_adapter_only_refuses_what_llama_cpp_cannot_apply(llama, tmp_path, field):
    """Each feature is refused by name, with the merged export suggested. The fields are set on
    the loaded config directly: some are newer than this LoraConfig."""
    _, base, adapter = llama
    model = lorafit.load(copy.deepcopy(base), adapter)
    setattr(model.peft_config["default"], field, ["lm_head"] if field == "modules_to_save" else True)
    with pytest.raises(ExportError, match=f"{ADAPTER_ONLY_REFUSALS[field].split(' (')[0]}.*merged model"):
        adapter_to_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("field", sorted(v.field for v in lorafit.registry.extensions().variants))
def test_adapter_only_refuses_every_variant_by_name(llama, tmp_path, field):
    """llama.cpp applies plain LoRA only: a config selecting any variant is refused by its field."""
    _, base, adapter = llama
    model = lorafit.load(copy.deepcopy(base), adapter)
    setattr(model.peft_config["default"], field, True)
    with pytest.raises(ExportError, match=f"the {field} variant .*merged model"):
        adapter_to_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_adapter_only_refuses_dora_and_embedding_adapters(llama, tmp_path):
    _, base, _ = llama
    dora = lorafit.wrap(copy.deepcopy(base), lorafit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ExportError, match="DoRA.*Export the merged model"):
        adapter_to_gguf(dora, tmp_path / "a.gguf")
    embedding = lorafit.wrap(copy.deepcopy(base), lorafit.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ExportError, match="embedding 'model.embed_tokens'"):
        adapter_to_gguf(embedding, tmp_path / "a.gguf")
