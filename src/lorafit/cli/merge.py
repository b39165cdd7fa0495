"""``lorafit merge --base BASE --adapter DIR --out DIR [--dtype bf16]``: a plain Hugging Face model."""

from __future__ import annotations

import argparse

from .support import PICKLE_HELP, add_dtype_option, requires


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base model and save the result",
                              description="Merge an adapter into its base model and save a plain Hugging "
                                          "Face model directory (tokenizer copied when there is one).",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="base model directory or Hub id")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not exist or be empty)")
    add_dtype_option(p, "dtype of the saved weights; auto keeps the base model's (the merge itself runs in fp32)")
    p.add_argument("--strict", action="store_true", help="refuse a base model whose fingerprint differs")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=run)


@requires("train")
def run(args: argparse.Namespace) -> int:
    from ..export.merged import export_merged

    out = export_merged(args.base, args.adapter, args.out, dtype=args.dtype, strict=args.strict,
                        allow_pickle=args.allow_pickle)
    print(f"merged model written to {out}")
    return 0
