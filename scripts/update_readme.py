"""Regenerate the README sections that are made from code and results, never typed by hand.

    python scripts/update_readme.py          # rewrite README.md
    python scripts/update_readme.py --check  # exit 1 if README.md is out of date

Sections (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``): ``config`` (every run
config key, its default and description, from the dataclasses), ``peft_fields`` (PEFT's
LoraConfig fields: supported, refused or kept, from `lorafit.config.FEATURES` and the registry), ``serve`` (bench/serve_load.json)
and ``bench`` (bench/results.json, rendered by bench/run.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def config_section() -> str:
    from lorafit.train.config import config_reference

    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in config_reference():
        rows.append(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def peft_fields_section() -> str:
    """PEFT 0.21.2's 42 LoraConfig fields: lorafit's LoraConfig fields (feature fields supported
    when an extension claims them), the keys kept without effect, and the ones PEFT drops."""
    from lorafit.adapter_files.peft_config import BOOKKEEPING, DROPPED
    from lorafit.config import FEATURES, field_names
    from lorafit.registry import claimed_fields, extensions
    from lorafit.train.config import config_reference

    docs = {key.removeprefix("lora."): doc for key, _, doc in config_reference() if key.startswith("lora.")}
    claimed = claimed_fields()
    modules = {s.field: s.find.__module__ for s in extensions().sources}
    modules.update({v.field: v.weights.__module__ for v in extensions().variants})
    modules.update({r.field: r.rewrite.__module__ for r in extensions().rewrites})
    rows = ["| PEFT field | in lorafit | what it does |", "|---|---|---|"]
    for name in sorted(set(field_names()) | BOOKKEEPING | DROPPED):
        if name in FEATURES and name not in claimed:
            status, what = "refused when set", FEATURES[name]
        elif name in FEATURES:
            where = f" (`{modules[name]}`)" if name in modules else ""
            status, what = f"supported{where}", docs[name]
        elif name in docs:
            status, what = "supported", docs[name]
        elif name in DROPPED:
            status, what = "dropped on load (as PEFT)", "runtime-only"
        else:
            status, what = "kept, written back", "no effect on the adapter's outputs"
        rows.append(f"| `{name}` | {status} | {what.replace('|', '/').rstrip('.')} |")
    return "\n".join(rows)


def serve_section() -> str:
    path = ROOT / "bench" / "serve_load.json"
    if not path.exists():
        return "(not measured yet: run `python bench/serve_load.py`)"
    data = json.loads(path.read_text())
    s, r = data["setup"], data["result"]
    return (f"| clients x requests | errors | p50 | p95 | max | requests/s | tokens/s |\n"
            f"|---|---:|---:|---:|---:|---:|---:|\n"
            f"| {r['clients']} x {r['requests'] // r['clients']} | {r['errors']} | {r['p50_s'] * 1000:.0f} ms "
            f"| {r['p95_s'] * 1000:.0f} ms | {r['max_s'] * 1000:.0f} ms | {r['requests_per_s']:.0f} "
            f"| {r['completion_tokens_per_s']:.0f} |\n\n"
            f"{s['model']}, {s['adapters']} adapters, max_tokens {s['max_tokens']}, greedy; "
            f"{s['machine']}, torch {s['torch']}.")


def bench_section() -> str:
    path = ROOT / "bench" / "results.json"
    if not path.exists():
        return "(not measured yet: run `make bench`)"
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses in the module look themselves up there
    spec.loader.exec_module(bench)
    return bench.render_table(json.loads(path.read_text()))


SECTIONS = {"config": config_section, "peft_fields": peft_fields_section, "serve": serve_section, "bench": bench_section}


def render(text: str) -> str:
    for name, make in SECTIONS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"README.md: missing the markers {start} ... {end}")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{make()}\n{end}{tail}"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args(argv)
    current = README.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md is out of date: run python scripts/update_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
