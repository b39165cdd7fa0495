"""Tiny, fully local models and tokenizers for tests, examples and benchmarks.

Nothing here downloads: the tokenizer is a byte-level BPE trained in memory on the given texts,
and the models are built from configs with random weights.
"""

from __future__ import annotations

from typing import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
DEFAULT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adaptation trains two small matrices per layer.",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one sentence.",
    "List three prime numbers: 2, 3, 5.",
    "Translate 'good morning' into French: bonjour.",
] * 4


def build_tokenizer(texts: Iterable[str] = DEFAULT_TEXTS, vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with a chat template.

    Any string can be encoded (byte fallback), so the tokenizer works for unseen text too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
               intermediate: int | None = None, seed: int = 0, **overrides):
    """A randomly initialised `LlamaForCausalLM` small enough for unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_causal_lm_dir(path, texts: Iterable[str] = DEFAULT_TEXTS, vocab_size: int = 512, **model_kw):
    """Save a tiny Llama and its tokenizer to `path` (a Hugging Face model directory) and return it."""
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_llama(vocab_size=len(tokenizer), **model_kw)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_moe_dir(path, texts: Iterable[str] = DEFAULT_TEXTS, experts: int = 3, seed: int = 0):
    """Save a tiny random Mixtral (`experts` experts, top 2, weights as 3-D parameters) and its
    tokenizer to `path` and return it."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = build_tokenizer(texts)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=experts, num_experts_per_tok=2,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
