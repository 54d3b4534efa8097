"""Run every bench/bench_*.py (or those named), write bench/results.json, print a table.

python -m bench              all benchmarks
python -m bench kvm          bench_kvm.py only
python -m bench --markdown   bench/results.json as a Markdown table (for the README)
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench import RESULTS, Metric, record


def modules(names: Sequence[str]) -> list[str]:
    found = sorted(
        m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )  # fmt: skip
    if not names:
        return found
    wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in names}
    unknown = wanted - set(found)
    if unknown:
        raise SystemExit(f"bench: no such benchmark: {', '.join(sorted(unknown))}")
    return [m for m in found if m in wanted]


def table(results: dict[str, Metric]) -> str:
    """80 columns: name, value, unit, baseline, ratio."""
    lines = [f"{'metric':<36} {'value':>12} {'unit':<9} {'baseline':>12} {'ratio':>6}"]
    for name, m in sorted(results.items()):
        base = "-" if m["baseline"] is None else f"{m['baseline']:.6g}"
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.3f}"
        lines.append(
            f"{name[:36]:<36} {m['value']:>12.6g} {m['unit'][:9]:<9} {base:>12} {ratio:>6}"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Metric]) -> str:
    rows = ["| metric | value | unit | baseline | ratio |", "|---|---:|---|---:|---:|"]
    for name, m in sorted(results.items()):
        base = "" if m["baseline"] is None else f"{m['baseline']:.4g}"
        ratio = "" if m["ratio"] is None else f"{m['ratio']:.3f}"
        rows.append(f"| `{name}` | {m['value']:.4g} | {m['unit']} | {base} | {ratio} |")
    return "\n".join(rows)


def main(argv: Sequence[str]) -> int:
    if list(argv) == ["--markdown"]:
        print(markdown(json.loads(RESULTS.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = []
    measured: dict[str, Metric] = {}
    for name in modules(argv):
        print(f"== {name}", flush=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            metrics: dict[str, Metric] = module.run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        record(metrics)
        measured.update(metrics)
    print(f"\n{RESULTS}:")
    print(table(measured))
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
