"""``lorafit generate --base MODEL [--adapter DIR] (--prompt TEXT | --chat)``: greedy or sampled text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

from ..errors import ConfigError
from .support import HelpFormatter, add_dtype_option, requires


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
    add_dtype_option(p, "weights' dtype")
    p.set_defaults(func=run)


@requires("train")
def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from ..generation import Sampling, generate, prompt_ids
    from ..train.modeling import load_trained

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    model, tokenizer, labels = load_trained(args.base, args.adapter, args.dtype)
    if labels is not None:
        raise ConfigError(f"{args.adapter}: a classifier adapter (labels {labels}); evaluate it with lorafit eval")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        ids = tokenizer(args.prompt)["input_ids"] if args.raw else prompt_ids(tokenizer, messages)
        generate(model, tokenizer, ids, sampling, streamer)
        print()
        return 0
    for line in user_lines(sys.stdin):
        messages.append({"role": "user", "content": line})
        answer = generate(model, tokenizer, prompt_ids(tokenizer, messages), sampling, streamer)
        messages.append({"role": "assistant", "content": answer})
        print()
    return 0


def user_lines(stream: Any) -> Iterator[str]:
    """Non-empty user messages until an empty line or end of input."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = stream.readline()
        if not line.strip():
            return
        yield line.strip()
