"""``lorafit combine --base BASE --adapter DIR --adapter DIR [--weights W W] --method M --out DIR``:
one new adapter directory from several (`lorafit.export.combined`), recording how it was made."""

from __future__ import annotations

import argparse

from .support import PICKLE_HELP, requires


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
    from ..export.combined import export_combined

    report = export_combined(args.base, args.adapter, args.out, weights=args.weights, method=args.method,
                             rank=args.rank, density=args.density, majority_sign_method=args.majority_sign_method,
                             seed=args.seed, allow_pickle=args.allow_pickle)
    error = f", relative truncation error {report.relative_error:.3g}" if args.method.endswith("svd") else ""
    print(f"combined adapter written to {args.out} ({args.method} of {len(args.adapter)} adapters, "
          f"rank {max(report.ranks.values())}{error})")
    return 0
