"""GGUF files for llama.cpp, Ollama and LM Studio: the merged model, or the adapter alone.

    lorafit.export.to_gguf(merged_model, "out/model.gguf", tokenizer, outtype="f16")
    lorafit.export.adapter_to_gguf(lora_model, "out/adapter.gguf")      # llama.cpp --lora

The ``gguf`` package (published by llama.cpp) writes the file and names the tensors
(``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``); what llama.cpp expects
beyond a renaming is done here:

* **Rope layout.** Hugging Face's Llama rotates the pairs (i, i + d/2) of each head's d
  dimensions (``rotate_half``); llama.cpp's llama architecture rotates the adjacent pairs
  (2i, 2i + 1). The rows of W_q (and of W_k, with the key/value head count) are reordered per
  head so that HF row ``h·d + j·d/2 + i`` (half j ∈ {0, 1}) becomes row ``h·d + 2i + j``
  (`rope_permute`). q·k is unchanged, because the same permutation is applied to both and the
  dot product sums over all dimensions; v and the output projection keep their layout. For an
  adapter-only file the same reordering applies to the rows of lora_B (ΔW = s·B A, so permuting
  the rows of ΔW is permuting the rows of B); lora_A is unchanged. Qwen2 runs on llama.cpp's
  ``qwen2`` architecture, which uses the half-split (NeoX) rotation: nothing is reordered.
* **Mistral** is the llama architecture with other defaults, and llama.cpp's own converter
  writes it as ``llama``; so does lorafit. llama.cpp's llama architecture attends to the whole
  context: logits equal Hugging Face's Mistral (sliding window ``config.sliding_window``) for
  sequences up to that window, which is 4096 tokens and more in released Mistral models.
* **One alpha.** A LoRA GGUF holds a single ``adapter.lora.alpha``, and llama.cpp scales each
  tensor pair by ``alpha / r_ℓ`` with r_ℓ that pair's rank. Per-module scales (``rank_pattern``,
  ``alpha_pattern``, rsLoRA's ``alpha / sqrt(r)``) are folded into B: with the file's alpha
  α = ``lora_alpha`` and layer ℓ's scale s_ℓ, lora_B is written as ``B_ℓ · s_ℓ · r_ℓ / α`` so
  that llama.cpp's ``(α / r_ℓ) · B'_ℓ A_ℓ = s_ℓ · B_ℓ A_ℓ``. For a plain config the factor is 1.

Output types: f32, f16, bf16 and q8_0 (blocks of 32 weights sharing one f16 scale) for the 2-D
weights; 1-D tensors (norms, biases) stay f32, and q8_0 falls back to f16 for a weight whose rows
are not a multiple of 32 long, as llama.cpp's converter does.

Every file is written atomically (`lorafit.atomic`): a crash or a full disk leaves the previous
file, or none, never half of one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, TextIO, Union

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import PathLike, atomic_write_files
from ..config import FEATURES
from ..errors import ExportError
from ..model import LoraModel
from ..registry import selected_variant
from .gguf_vocab import GgufVocab, gguf_vocab

# --outtype -> (GGML type of the 2-D weights, general.file_type)
OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
MODELFILE_NAME = "Modelfile"
# a tensor to write: (GGUF name, tensor, head count to rope-permute its rows with, or None)
Planned = tuple[str, Tensor, Optional[int]]


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` runs in llama.cpp."""

    arch: gguf.MODEL_ARCH
    """llama.cpp's architecture (``general.architecture``) and the source of the tensor names."""
    rope_permute: bool
    """The q/k rows are reordered for llama.cpp's interleaved rope (`rope_permute`)."""

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# Hugging Face model_type -> its llama.cpp architecture
ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, rope_permute=False),
}
# Adapter features llama.cpp cannot apply at load time: LoraConfig field -> what it is. Every
# variant of the adapter maths (DoRA, lora_bias, ...: `lorafit.registry.Variant`) is refused too.
ADAPTER_ONLY_REFUSALS = {
    "modules_to_save": "modules_to_save (whole trained modules)",
    "target_parameters": "target_parameters (adapters on bare parameters)",
    "trainable_token_indices": "trainable tokens (replaced embedding rows)",
    "layer_replication": "layer replication (a different layer stack)",
}


def rope_permute(rows: Tensor, n_heads: int) -> Tensor:
    """Reorder the rows of a q or k projection (its weight [n_heads·d, in], bias [n_heads·d] or
    lora_B [n_heads·d, r]) from Hugging Face's half-split rope layout to llama.cpp's interleaved
    one: row ``h·d + j·d/2 + i`` moves to row ``h·d + 2i + j`` (head h, half j ∈ {0, 1}, i < d/2).
    Same shape out."""
    d = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, d // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> Tensor:
    """The divisors [head_dim / 2] that turn each rope frequency f_i = θ^(-2i/d) into Llama 3.1's
    (rope_type ``llama3``), written as llama.cpp's ``rope_freqs`` tensor (it rotates by f_i /
    factor_i). With wavelength λ_i = 2π / f_i, original context L, scale k and the low/high
    frequency factors a, b: factor 1 where λ_i < L / b, k where λ_i > L / a, and in between
    ``1 / ((1 - t) / k + t)`` with ``t = (L / λ_i - a) / (b - a)``."""
    theta, k = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    context = float(rope["original_max_position_embeddings"])
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * torch.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    factors = 1 / ((1 - smooth) / k + smooth)
    factors = torch.where(wavelength < context / high, torch.ones_like(factors), factors)
    return torch.where(wavelength > context / low, torch.full_like(factors, k), factors).float()


def architecture(config: Any) -> Architecture:
    """The llama.cpp architecture of a Hugging Face `config`; `ExportError` lists the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"model_type {model_type!r} has no GGUF mapping in lorafit; supported: "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


# -- from files ---------------------------------------------------------------------------------


def export_gguf(base: str, adapter: Optional[str], out: PathLike, outtype: Optional[str] = None,
                adapter_only: bool = False, modelfile: bool = True, strict: bool = False, allow_pickle: bool = False,
                progress: Union[bool, TextIO] = False) -> Path:
    """``lorafit export``: load `base` (directory or Hub id) with the adapter directory `adapter`
    (`lorafit.export.merged.load_adapted`) and write the merged model (`to_gguf`, default
    outtype f16, tokenizer from the adapter directory or else the base) or, with
    `adapter_only`, the adapter alone (`adapter_to_gguf`, default outtype f32). Without
    `adapter`, the base model itself is written: the file an adapter-only GGUF is applied to."""
    import transformers

    from .merged import find_tokenizer, load_adapted

    if adapter is None:
        if adapter_only:
            raise ExportError("an adapter-only export needs the adapter directory (--adapter)")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    else:
        adapted, _ = load_adapted(base, adapter, strict=strict, allow_pickle=allow_pickle)
        if adapter_only:
            return adapter_to_gguf(adapted, out, outtype=outtype or "f32", progress=progress)
        model = adapted.merge_and_unload(safe=True)
    sources = [base] if adapter is None else [adapter, base]
    tokenizer = find_tokenizer(*sources)
    if tokenizer is None:
        raise ExportError(f"no tokenizer loads from {' or '.join(map(repr, sources))}; a GGUF model file needs one")
    return to_gguf(model, out, tokenizer, outtype=outtype or "f16", modelfile=modelfile, progress=progress)


# -- merged model ------------------------------------------------------------------------------


def to_gguf(model: nn.Module, out: PathLike, tokenizer: Any, outtype: str = "f16", modelfile: bool = True,
            progress: Union[bool, TextIO] = False) -> Path:
    """Write a merged Hugging Face causal LM (e.g. ``lora_model.merge_and_unload()``) with its
    `tokenizer` and chat template as one GGUF file at `out`, and an Ollama ``Modelfile`` beside
    it (`modelfile_text`). Returns `out`.

    The weights are the model's, renamed and laid out for llama.cpp (module docstring: q/k rope
    permutation, Mistral as llama); `outtype` is one of `OUTTYPES`. `progress` prints a line per
    tensor group (one transformer block, the embeddings, ...) to stderr, or to the given stream.
    """
    if isinstance(model, LoraModel):
        if model.adapter_names:
            raise ExportError("to_gguf takes a merged model: call model.merge_and_unload() first, or export "
                              "the adapter alone with lorafit.export.adapter_to_gguf")
        model = model.model
    config = getattr(model, "config", None)
    arch = architecture(config)
    _check_outtype(outtype)
    tensors = _model_tensors(model, config, arch)
    n_vocab = next(tensor for name, tensor, _ in tensors if name == "token_embd.weight").shape[0]
    vocab = gguf_vocab(tokenizer, n_vocab)

    def keys(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(_model_name(config))
        _add_hyperparameters(writer, config, n_vocab)
        vocab.add_to(writer)

    out = Path(out)
    files = [(out, lambda tmp: _write_gguf(tmp, arch, keys, tensors, outtype, progress))]
    if modelfile:
        text = modelfile_text(out.name, vocab)
        files.append((out.parent / MODELFILE_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8")))
    atomic_write_files(files)
    return out


def modelfile_text(gguf_name: str, vocab: GgufVocab) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` in the same directory.

    Ollama reads the chat template and the special tokens from the GGUF itself (a known
    template is recognised from ``tokenizer.chat_template``); the Modelfile adds the end of
    sequence as a stop word so generation ends where the fine-tune learned to stop."""
    lines = ["# Ollama: ollama create NAME -f Modelfile, then ollama run NAME", f"FROM ./{gguf_name}"]
    if vocab.eos_text:
        lines.append(f"PARAMETER stop {_go_string(vocab.eos_text)}")
    return "\n".join(lines) + "\n"


def _model_tensors(model: nn.Module, config: Any, arch: Architecture) -> list[Planned]:
    """(GGUF name, tensor, heads to rope-permute its rows with or None) for every weight of
    `model`, in file order.

    An output head that is the embedding (tied) is left out: llama.cpp then reuses token_embd.
    A weight the mapping has no name for is refused rather than dropped."""
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    state = model.state_dict(keep_vars=True)
    heads = {"q": config.num_attention_heads, "k": getattr(config, "num_key_value_heads", None)
             or config.num_attention_heads}
    tensors, unknown = [], []
    for key, tensor in state.items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or name.endswith("attn_rot_embd"):
            if not key.endswith("rotary_emb.inv_freq"):
                unknown.append(key)
            continue
        if name == "output.weight" and _tied(tensor, state):
            continue
        tensors.append((name, tensor.detach(), _rope_heads(name, heads, arch)))
    if unknown:
        raise ExportError(f"{type(model).__name__} has weights without a GGUF name for {arch.name}: "
                          f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    rope = _rope_parameters(config)
    if rope["rope_type"] == "llama3":
        if gguf.MODEL_TENSOR.ROPE_FREQS not in gguf.MODEL_TENSORS[arch.arch]:
            raise ExportError(f"rope type 'llama3' needs a rope_freqs tensor, which llama.cpp's {arch.name} lacks")
        tensors.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                        llama3_rope_factors(rope, _head_dim(config)), None))
    return tensors


def _tied(head: Tensor, state: dict[str, Tensor]) -> bool:
    embed = next(t for k, t in state.items() if k.endswith("embed_tokens.weight"))
    return head is embed or (head.shape == embed.shape and torch.equal(head, embed))


def _rope_heads(name: str, heads: dict[str, int], arch: Architecture) -> Optional[int]:
    """The head count to `rope_permute` the rows of GGUF tensor `name` (a weight, bias or lora_B)
    with for llama.cpp's rope layout, or None when it keeps its layout."""
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    return heads[kind[-1]] if arch.rope_permute and kind in ("attn_q", "attn_k") else None


def _add_hyperparameters(writer: gguf.GGUFWriter, config: Any, n_vocab: int) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for a llama-family model."""
    n_heads = config.num_attention_heads
    head_dim = _head_dim(config)
    writer.add_vocab_size(n_vocab)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config: Any) -> dict:
    """The config's rope settings (transformers 5 ``rope_parameters``, older ``rope_scaling`` and
    ``rope_theta``) with ``rope_type`` and ``rope_theta`` always set; `ExportError` for a rope
    type llama.cpp's llama/qwen2 cannot reproduce from lorafit's file."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_theta"] = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise ExportError(f"config rope type {rope['rope_type']!r} is not supported by lorafit's GGUF export; "
                          "supported: default, linear, llama3")
    return rope


def _model_name(config: Any) -> str:
    source = getattr(config, "_name_or_path", "") or config.model_type
    return Path(str(source)).name or config.model_type


def _go_string(text: str) -> str:
    """`text` as a double-quoted Modelfile string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- adapter only ------------------------------------------------------------------------------


def adapter_to_gguf(model: LoraModel, out: PathLike, adapter_name: Optional[str] = None, outtype: str = "f32",
                    progress: Union[bool, TextIO] = False) -> Path:
    """Write adapter `adapter_name` (default: the active one) of `model` as a LoRA GGUF that
    llama.cpp applies to the base model's GGUF at load time (``llama-cli -m base.gguf --lora
    out.gguf``; Ollama's ``ADAPTER``). Returns `out`.

    For each adapted linear layer ℓ the file holds ``<weight>.lora_a`` = A_ℓ [r_ℓ, in] and
    ``<weight>.lora_b`` = B_ℓ · s_ℓ · r_ℓ / α [out, r_ℓ] (rows rope-permuted for q/k where the
    architecture needs it), and ``adapter.lora.alpha`` = α = ``lora_alpha``; llama.cpp adds
    ``(α / r_ℓ) · lora_b · lora_a`` = s_ℓ B_ℓ A_ℓ to W_ℓ. Raises `ExportError` for what llama.cpp
    cannot apply (any variant such as DoRA or lora_bias, modules_to_save, embedding adapters,
    target_parameters, trainable tokens, layer replication), suggesting the merged export.
    """
    if not isinstance(model, LoraModel):
        raise ExportError(f"adapter_to_gguf takes a lorafit LoraModel, got {type(model).__name__}")
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ExportError(f"unknown adapter {name!r}; this model has {model.adapter_names}")
    config = model.peft_config[name]
    base_config = getattr(model.model, "config", None)
    arch = architecture(base_config)
    _check_outtype(outtype)
    layers = [(module, layer) for module, layer in model.lora_layers() if name in layer.lora]
    _refuse_adapter_features(name, config, layers)
    names = gguf.get_tensor_name_map(arch.arch, base_config.num_hidden_layers)
    heads = {"q": base_config.num_attention_heads,
             "k": getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads}
    alpha = float(config.lora_alpha)
    tensors = []
    for module, layer in layers:
        weights = layer.lora[name]
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(f"adapter {name!r} targets {module!r}, which has no GGUF tensor for {arch.name}")
        fold = weights.scaling * weights.rank / alpha
        tensors.append((f"{target}.lora_a", weights.A.detach(), None))
        tensors.append((f"{target}.lora_b", weights.B.detach() * fold, _rope_heads(target, heads, arch)))

    def keys(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name)

    out = Path(out)
    atomic_write_files([(out, lambda tmp: _write_gguf(tmp, arch, keys, tensors, outtype, progress))])
    return out


def _refuse_adapter_features(name: str, config: Any, layers: Sequence[tuple[str, Any]]) -> None:
    """`ExportError` naming every feature of adapter `name` that llama.cpp's LoRA loader lacks.
    Fields are read with getattr: a LoraConfig without the field does not use the feature."""
    variant = selected_variant(config)
    found = [f"the {variant.field} variant ({FEATURES.get(variant.field, 'other adapter maths')}, which llama.cpp "
             "does not apply)"] if variant else []
    found += [what for field, what in ADAPTER_ONLY_REFUSALS.items() if getattr(config, field, None)]
    merged = [module for module, layer in layers if name in layer.merged]
    found += [f"an adapter on the embedding {module!r}" for module, layer in layers
              if isinstance(layer.base_layer, nn.Embedding)]
    found += [f"an adapter on {module!r}, a {type(layer.base_layer).__name__} (llama.cpp applies LoRA to "
              "linear weights)" for module, layer in layers
              if not isinstance(layer.base_layer, (nn.Linear, nn.Embedding))]
    if merged:
        found.append(f"adapter already merged into {merged[0]!r} (unmerge() first)")
    if not layers:
        found.append("no adapted layers")
    if found:
        raise ExportError(f"adapter {name!r} cannot be exported as a llama.cpp LoRA GGUF: it uses "
                          f"{'; '.join(found)}. Export the merged model instead (lorafit.export.to_gguf, "
                          "or lorafit export without --adapter-only)")


# -- writing -----------------------------------------------------------------------------------


def _check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not supported; choose one of {', '.join(OUTTYPES)}")


def _tensor_type(tensor: Tensor, outtype: str) -> gguf.GGMLQuantizationType:
    """1-D tensors stay f32; q8_0 needs rows that are a whole number of 32-weight blocks."""
    qtype = OUTTYPES[outtype][0]
    if tensor.dim() < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return gguf.GGMLQuantizationType.F16 if tensor.shape[-1] % block else qtype


def _encode(tensor: Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def _nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _write_gguf(path: Path, arch: Architecture, keys: Callable[[gguf.GGUFWriter], None],
                tensors: Iterable[Planned], outtype: str, progress: Union[bool, TextIO]) -> None:
    """Write a GGUF file at `path`: `keys` adds the metadata, then each tensor is laid out
    (rope-permuted), converted to its type and written in turn, so one converted tensor at a time
    is held in memory beside the model."""
    plan = [(name, tensor, heads, _tensor_type(tensor, outtype)) for name, tensor, heads in tensors]
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    keys(writer)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, tensor, _, qtype in plan:
        writer.add_tensor_info(name, tuple(tensor.shape), np.dtype(np.float32), _nbytes(tensor.shape, qtype),
                               raw_dtype=qtype)
    stream = (sys.stderr if progress is True else progress) or None
    report = _Progress(plan, stream) if stream else None
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, tensor, heads, qtype in plan:
            writer.write_tensor_data(_encode(tensor if heads is None else rope_permute(tensor, heads), qtype))
            if report:
                report.written(name, _nbytes(tensor.shape, qtype))
    finally:
        writer.close()


class _Progress:
    """One line per tensor group (``blk.N``, ``token_embd``, ...) once all its tensors are written:
    ``gguf: blk.3 done (5/34 groups, 1.20 GiB of 13.48 GiB)``."""

    def __init__(self, plan: Sequence[tuple[str, Tensor, Any, Any]], stream: TextIO):
        self.stream = stream
        self.left: dict[str, int] = {}
        for name, *_ in plan:
            self.left[_group(name)] = self.left.get(_group(name), 0) + 1
        self.total_groups = len(self.left)
        self.total_bytes = sum(_nbytes(tensor.shape, qtype) for _, tensor, _, qtype in plan)
        self.done_groups, self.done_bytes = 0, 0

    def written(self, name: str, nbytes: int) -> None:
        group = _group(name)
        self.left[group] -= 1
        self.done_bytes += nbytes
        if self.left[group] == 0:
            self.done_groups += 1
            print(f"gguf: {group} done ({self.done_groups}/{self.total_groups} groups, "
                  f"{_size(self.done_bytes)} of {_size(self.total_bytes)})", file=self.stream, flush=True)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _group(name: str) -> str:
    return ".".join(name.split(".")[:2]) if name.startswith("blk.") else name.split(".")[0]
