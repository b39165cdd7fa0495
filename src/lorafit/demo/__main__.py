"""``python -m lorafit.demo [--task sentiment|chat] [--max-steps N] [--output DIR]``: see
`lorafit.demo` (sentiment, the default) and `lorafit.demo.chat` (a causal LM). Each run ends
with its own wall time, measured from the start of the command."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m lorafit.demo", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", choices=["sentiment", "chat"], default="sentiment",
                        help="sentiment: classify reviews with all-MiniLM-L6-v2; chat: instruction-tune a "
                             "small local Llama")
    parser.add_argument("--max-steps", type=int, help="stop after N steps (default: the demo's epochs)")
    parser.add_argument("--output", type=Path, help="output directory (default: runs/<task>-<date>-<time>)")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the new head's "missing weights" table is expected
    transformers.logging.disable_progress_bar()

    output = args.output or Path("runs") / time.strftime(f"{args.task}-%Y%m%d-%H%M%S")
    (sentiment if args.task == "sentiment" else chat)(output, args.max_steps)
    print(f"\nthis demo took {time.perf_counter() - started:.0f} s on this machine "
          f"({torch.get_num_threads()} torch threads)")
    return 0


def sentiment(output: Path, max_steps: int | None) -> None:
    from ..train.metrics import read_metrics
    from ..train.modeling import load_trained
    from ..train.trainer import train
    from . import SENTENCES, data_file, demo_config, model_path

    with data_file() as tsv:
        summary = train(demo_config(tsv, output, max_steps))
    before = next(r["eval_accuracy"] for r in read_metrics(output / "metrics.jsonl") if "eval_accuracy" in r)
    after = summary["eval"]["accuracy"]
    print(f"\nheld-out accuracy: {before:.1%} before, {after:.1%} after "
          f"({summary['data']['eval_examples']} reviews)")

    model, tokenizer, labels = load_trained(model_path(), output / "adapter", dtype="fp32")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    print(f"adapter saved to {output / 'adapter'} and loaded back; it says:")
    for sentence, label in zip(SENTENCES, predicted):
        print(f"  {labels[label]:>8}  {sentence}")


def chat(output: Path, max_steps: int | None) -> None:
    from ..train.metrics import read_metrics
    from ..train.modeling import load_trained
    from ..train.trainer import train
    from .chat import build_base, chat_config, data_files, read_rows

    base, run = output / "base", output / "run"
    with data_files() as files:
        build_base(files, base)
        summary = train(chat_config(base, files, run, max_steps))
        # questions (no input): what `lorafit generate --prompt` asks too
        trained, held_out = ([row for row in read_rows(path) if not row["input"]] for path in files)
    before = next(r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r)
    print(f"\nheld-out loss: {before:.3f} before, {summary['eval']['loss']:.3f} after "
          f"({summary['data']['eval_examples']} instructions)")

    model, tokenizer, _ = load_trained(str(base), run / "adapter", dtype="fp32")
    print(f"adapter saved to {run / 'adapter'} and loaded back; it answers (greedy):")
    # greedy, at most 128 new tokens: what `lorafit generate` does by default
    for row, seen in ((trained[0], "trained on"), (trained[1], "trained on"), (held_out[0], "held out")):
        prompt = row["instruction"]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=128, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        print(f"  ({seen}) {prompt!r} -> {answer!r} (the data: {row['output']!r})")
    prompt = shlex.quote(trained[0]["instruction"])
    print(f"\nnext, with the same files:\n"
          f"  lorafit generate --base {base} --adapter {run / 'adapter'} --prompt {prompt}\n"
          f"  lorafit eval {run}\n"
          f"  lorafit serve --base {base} --adapters {run}    # the adapter is served as model 'adapter'")


if __name__ == "__main__":
    sys.exit(main())
