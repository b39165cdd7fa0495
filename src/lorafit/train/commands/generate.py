"""``lorafit generate --base MODEL [--adapter DIR] (--prompt TEXT | --chat)``: greedy or sampled text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from . import HelpFormatter


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a base model and an adapter",
        description="Generate text with a causal LM and (optionally) a LoRA adapter. --prompt is "
                    "rendered as a user message with the tokenizer's chat template, or with the "
                    "plain instruction template when there is none (as the instruction data format "
                    "does); --raw feeds it unchanged. --chat reads one message per line from stdin "
                    "and keeps the conversation. Temperature 0 is greedy decoding.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--base", required=True, help="base model: a local Hugging Face model directory or hub id")
    p.add_argument("--adapter", type=Path, metavar="DIR", help="adapter directory (e.g. RUN_DIR/adapter)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="generate one answer to TEXT")
    mode.add_argument("--chat", action="store_true", help="interactive chat on stdin (empty line or EOF ends)")
    p.add_argument("--raw", action="store_true", help="use --prompt as plain text, without any template")
    p.add_argument("--system", help="system message placed before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest token set of this probability")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="weights' dtype")
    p.set_defaults(func=run)


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt for `messages` (ending with a user turn), encoded as the data
    pipeline encodes instruction and chat examples: the chat template (which writes its own
    special tokens), else the plain instruction template with the tokenizer's special tokens."""
    from ...data import DEFAULT_PROMPT_TEMPLATE
    from ...data.chat import has_chat_template, render, tokens

    if has_chat_template(tokenizer):
        return tokens(tokenizer, render(tokenizer, messages, generation_prompt=True))
    if sum(m["role"] == "user" for m in messages) > 1:
        raise ConfigError("--chat needs a tokenizer with a chat template; this one has none (use --prompt)")
    system = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
    return tokenizer(system + DEFAULT_PROMPT_TEMPLATE.format(prompt=messages[-1]["content"]))["input_ids"]


def generate(model: Any, tokenizer: Any, ids: list[int], args: argparse.Namespace) -> str:
    """The continuation of prompt `ids`, printed token by token as it is generated."""
    import torch
    from transformers import TextStreamer

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k or None} if args.temperature > 0 else {"do_sample": False}
    torch.manual_seed(args.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=args.max_new_tokens, pad_token_id=pad_id,
                             streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
                             **sampling)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def run(args: argparse.Namespace) -> int:
    from ..modeling import load_trained

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens = {args.max_new_tokens}: expected at least 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature = {args.temperature}: expected 0 (greedy) or more")
    model, tokenizer, labels = load_trained(args.base, args.adapter, args.dtype)
    if labels is not None:
        raise ConfigError(f"{args.adapter}: a classifier adapter (labels {labels}); evaluate it with lorafit eval")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        ids = tokenizer(args.prompt)["input_ids"] if args.raw else prompt_ids(tokenizer, messages)
        generate(model, tokenizer, ids, args)
        print()
        return 0
    for line in _lines(sys.stdin):
        messages.append({"role": "user", "content": line})
        answer = generate(model, tokenizer, prompt_ids(tokenizer, messages), args)
        messages.append({"role": "assistant", "content": answer})
        print()
    return 0


def _lines(stream: Any):
    """Non-empty user messages until an empty line or end of input."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = stream.readline()
        if not line.strip():
            return
        yield line.strip()
