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
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# every linear layer of the block, with per-module rank/alpha and rsLoRA so the folding shows
LORA = dict(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"k_proj": 3, "up_proj": 16})


def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's split regex and a ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
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
    return {"llama": build_tokenizer, "qwen2": qwen2_tokenizer,
            "mistral": lambda: sentencepiece_tokenizer(directory / "spm")}[kind]()


def tiny_model(kind: str, vocab_size: int) -> torch.nn.Module:
    """hidden 64, 2 layers, 4 query heads sharing 2 key/value heads; weights a little larger than
    the default init so the logits spread."""
    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 initializer_range=0.08, rms_norm_eps=1e-5, tie_word_embeddings=kind == "qwen2")
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
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
