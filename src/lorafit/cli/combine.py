"""``lorafit combine --base BASE --adapter DIR --adapter DIR [--weights W W] --method M --out DIR``:
one new adapter directory from several (`lorafit.combine`), recording how it was made."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .support import PICKLE_HELP, requires

NAME = re.compile(r"[A-Za-z0-9_-]+")  # the adapter names LoraModel accepts
RESULT = "combined"  # the new adapter's name inside the model (the saved directory has none)


def register(subparsers) -> None:
    from ..combine import METHODS
    from ..merge_methods import SIGN_METHODS

    p = subparsers.add_parser(
        "combine", help="combine adapters into a new one (cat, svd, linear, ties, dare_*, magnitude_prune)",
        description="Combine adapters of one base model into a new adapter directory, by any of PEFT's "
                    "add_weighted_adapter methods. The new adapter's file records the method, weights and "
                    "settings; lorafit inspect shows them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="base model directory or Hub id")
    p.add_argument("--adapter", required=True, action="append", metavar="DIR",
                   help="adapter directory or Hub id; repeat for each adapter")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one weight per --adapter, in order (negative subtracts); 1 each when unset")
    p.add_argument("--method", default="cat", choices=list(METHODS),
                   help="cat and svd are the exact weighted update (svd truncated to --rank); see lorafit.combine")
    p.add_argument("--rank", type=int, help="rank of the result, for the *svd methods")
    p.add_argument("--density", type=float,
                   help="kept fraction in (0, 1], for ties, dare_* and magnitude_prune (and their *_svd)")
    p.add_argument("--majority-sign-method", default="total", choices=list(SIGN_METHODS),
                   help="how ties and dare_ties elect each entry's sign")
    p.add_argument("--seed", type=int, help="seed of DARE's random masks; torch's global generator when unset")
    p.add_argument("--out", required=True, metavar="DIR", help="new adapter directory (must not exist or be empty)")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=run)


@requires("train")
def run(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from ..adapter_files import read_adapter_dir
    from ..combine import check_options
    from ..errors import AdapterFileError, ConfigError
    from ..export.merged import model_class
    from ..model import LoraModel

    weights = args.weights or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        raise ConfigError(f"--weights has {len(weights)} values for {len(args.adapter)} --adapter directories")
    check_options(args.method, args.rank, args.density, args.majority_sign_method)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterFileError(f"{out}: already exists and is not an empty directory; choose a new --out")
    names = adapter_names(args.adapter, reserved=RESULT)
    first = read_adapter_dir(args.adapter[0], allow_pickle=args.allow_pickle)
    base_class = model_class(transformers, first, transformers.AutoConfig.from_pretrained(args.base))
    model = LoraModel(base_class.from_pretrained(args.base, dtype=torch.float32))
    for name, source in zip(names, args.adapter):
        model.load_adapter(source, adapter_name=name, allow_pickle=args.allow_pickle)
    report = model.combine(dict(zip(names, weights)), name=RESULT, method=args.method, rank=args.rank,
                           density=args.density, majority_sign_method=args.majority_sign_method, seed=args.seed)
    metadata = report.as_metadata()
    metadata["combined"]["sources"] = dict(zip(names, args.adapter))
    model.save_adapter(out, adapter_names=[RESULT], metadata=metadata)
    error = f", relative truncation error {report.relative_error:.3g}" if args.method.endswith("svd") else ""
    print(f"combined adapter written to {out} ({args.method} of {len(names)} adapters, "
          f"rank {max(report.ranks.values())}{error})")
    return 0


def adapter_names(sources: list[str], reserved: str) -> list[str]:
    """A distinct adapter name per source: its folder name where that is a valid name, unused and
    not `reserved`, else ``adapterN`` (N its position, from 1)."""
    names: list[str] = []
    for i, source in enumerate(sources, 1):
        folder = Path(source.rstrip("/")).name
        usable = NAME.fullmatch(folder) and folder not in names and folder != reserved
        names.append(folder if usable else f"adapter{i}")
    return names
