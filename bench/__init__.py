"""Benchmarks (`make bench`): each metric measured side by side with its baseline in the
same run, merged into bench/results.json as
    {"metric_name": {"value": N, "unit": "...", "baseline": B, "ratio": N / B}, ...}
Every bench/bench_*.py module has `run() -> dict[str, dict]` returning such entries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().with_name("results.json")

Metric = dict[str, Any]


def metric(value: float, unit: str, baseline: float | None = None) -> Metric:
    """One result; `ratio` is value / baseline when there is a baseline."""
    ratio = value / baseline if baseline else None
    return {
        "value": round(value, 6),
        "unit": unit,
        "baseline": None if baseline is None else round(baseline, 6),
        "ratio": None if ratio is None else round(ratio, 4),
    }


def record(metrics: Mapping[str, Metric], path: Path = RESULTS) -> dict[str, Metric]:
    """Merge metrics into the results file (atomically: readers never see half a file)."""
    try:
        results: dict[str, Metric] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        results = {}
    results.update(metrics)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return results
