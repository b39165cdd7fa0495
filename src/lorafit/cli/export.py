"""``lorafit export --base MODEL [--adapter DIR] --format gguf --out FILE [--outtype q8_0] [--adapter-only]``:
a GGUF file for llama.cpp, Ollama and LM Studio (`lorafit.export.gguf`)."""

from __future__ import annotations

import argparse

from .support import PICKLE_HELP, requires


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write the fine-tuned model (or the adapter alone) as a GGUF file for llama.cpp / Ollama",
        description="Merge an adapter into its base model and write one GGUF file with the tokenizer and chat "
                    "template, plus an Ollama Modelfile beside it; or, with --adapter-only, the adapter as a LoRA "
                    "GGUF that llama.cpp applies to the base model's GGUF (--lora).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="base model directory or Hub id")
    p.add_argument("--adapter", metavar="DIR",
                   help="adapter directory; without it the base model is written (the file --adapter-only files "
                        "are applied to)")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format")
    p.add_argument("--out", required=True, metavar="FILE", help="GGUF file to write (replaced atomically)")
    p.add_argument("--outtype", default=None,
                   help="weight type: f32, f16, bf16 or q8_0 (default: f16 for the model, f32 for --adapter-only)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write only the adapter (a few MB), applied by llama.cpp at load time")
    p.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile beside the model")
    p.add_argument("--strict", action="store_true", help="refuse a base model whose fingerprint differs")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=run)


@requires("export")
def run(args: argparse.Namespace) -> int:
    from ..export.gguf import export_gguf

    out = export_gguf(args.base, args.adapter, args.out, outtype=args.outtype, adapter_only=args.adapter_only,
                      modelfile=not args.no_modelfile, strict=args.strict, allow_pickle=args.allow_pickle,
                      progress=True)
    print(f"{'adapter' if args.adapter_only else 'model' if args.adapter else 'base model'} written to {out}")
    return 0
