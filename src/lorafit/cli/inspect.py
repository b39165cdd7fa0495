"""``lorafit inspect DIR [--json]``: describe an adapter directory and check its format."""

from __future__ import annotations

import argparse
import json

from .support import PICKLE_HELP, requires


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="describe an adapter directory and check its format",
                              description="Describe an adapter directory (config, targets, ranks, "
                                          "parameter count, file sizes, base model) and check its format.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("adapter", metavar="DIR", help="adapter directory (adapter_config.json + weights)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.set_defaults(func=run)


@requires(None)
def run(args: argparse.Namespace) -> int:
    from ..adapter_files.report import describe_adapter, format_report

    report = describe_adapter(args.adapter, allow_pickle=args.allow_pickle)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0 if report["ok"] else 1
