"""``python -m lorafit.demo [--max-steps N] [--output DIR]``: see `lorafit.demo`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import SENTENCES, data_file, demo_config, model_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafit.demo", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--max-steps", type=int, help="stop after N steps (default: 3 epochs)")
    parser.add_argument("--output", type=Path, help="run directory (default: runs/demo-<date>-<time>)")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the new head's "missing weights" table is expected
    transformers.logging.disable_progress_bar()

    from ..train.metrics import read_metrics
    from ..train.modeling import load_trained
    from ..train.trainer import train

    output = args.output or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    with data_file() as tsv:
        summary = train(demo_config(tsv, output, args.max_steps))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
