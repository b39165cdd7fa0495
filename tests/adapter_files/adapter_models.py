"""Tiny models and helpers shared by the adapter-file tests."""

import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from lorafit.testing import tiny_llama

IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()


def tiny_bert_cls():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3)).eval()


def small_llama():
    return tiny_llama(vocab_size=100, hidden=32, heads=2)


def perturb_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    """Add noise to every trainable parameter (LoRA factors, DoRA magnitudes, modules_to_save
    copies, trained biases), so nothing a file must carry is left at its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
