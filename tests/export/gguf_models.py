"""Tiny Llama-, Qwen2- and Mistral-shaped models with trained-looking adapters, and their
tokenizers (byte-level BPE with GPT-2's and Qwen2's split, and SentencePiece), for the GGUF tests."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaTokenizer, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

import lorafit
from lorafit.testing import CHAT_TEMPLATE, DEFAULT_TEXTS, build_tokenizer

SAMPLE_TEXT = "Hello GGUF world!  Low-rank 42 adapters,\nrun in llama.cpp: ünïcode ok?"
# the split regexes in Qwen2's and Llama 3's tokenizer.json (they differ in \p{N} vs \p{N}{1,3})
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# wavelengths of head_dim 16 at θ = 10^4 run from 6 to 2·10^4: some below 256 / 4, some above 256
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
# every linear layer of the block, with per-module rank/alpha and rsLoRA so the folding shows
LORA = dict(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"k_proj": 3, "up_proj": 16})


def split_tokenizer(split: str, ignore_merges: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE that splits with the regex `split` first (Qwen2's and Llama 3's layout),
    with a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(DEFAULT_TEXTS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def sentencepiece_tokenizer(directory: Path) -> LlamaTokenizer:
    """A SentencePiece BPE (byte fallback, like Llama 2's and Mistral's) trained on the sample
    texts, loaded by transformers' LlamaTokenizer, with BOS added as Llama 2 does."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(DEFAULT_TEXTS), model_writer=model, vocab_size=380, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tokenizer_for(kind: str, directory: Path):
    return {"llama": build_tokenizer, "qwen2": lambda: split_tokenizer(QWEN2_SPLIT, ignore_merges=False),
            "llama3": lambda: split_tokenizer(LLAMA3_SPLIT, ignore_merges=True),
            "mistral": lambda: sentencepiece_tokenizer(directory / "spm")}[kind]()


def tiny_model(kind: str, vocab_size: int) -> torch.nn.Module:
    """hidden 64, 2 layers, 4 query heads sharing 2 key/value heads; weights a little larger than
    the default init so the logits spread. ``llama3`` is a Llama with Llama 3.1's rope scaling,
    set so that each of its three frequency bands holds some of the 8 frequencies."""
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 initializer_range=0.08, rms_norm_eps=1e-5, tie_word_embeddings=kind == "qwen2")
    if kind == "llama3":
        shape["rope_scaling"] = LLAMA3_ROPE
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "llama3": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    return model_cls(config_cls(**shape)).eval()


def trained_adapter(base: torch.nn.Module, directory: Path) -> Path:
    """Wrap a copy of `base` with `LORA` (both factors random, as after training), save it."""
    model = lorafit.wrap(copy.deepcopy(base), lorafit.LoraConfig(**LORA))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for weights in layer.lora.values():
                weights.B.copy_(0.2 * torch.randn(weights.B.shape, generator=generator))
    model.save_adapter(directory)
    return directory
