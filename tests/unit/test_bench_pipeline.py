"""bench/bench_pipeline.py keeps working: its recorded ring stream decodes without an
error and runs through the agent's drain (rules fire, alerts reach the journal)."""

from __future__ import annotations

from pathlib import Path

from bench import bench_pipeline as bp
from zonewatch.probes.records import (
    DECODERS,
    NET_DECODERS,
    PROC_DECODERS,
    DecodeErrors,
    decode_all,
)


def test_the_stream_decodes_and_runs_through_the_pipeline(tmp_path: Path) -> None:
    zones = bp.bench_zones(tmp_path / "shares")
    stream = bp.synth(zones, 6000)
    errors = DecodeErrors()
    registry = {**DECODERS, **NET_DECODERS, **PROC_DECODERS}
    records = decode_all(registry, [raw for _, raw in stream], errors)
    assert len(records) == len(stream) and errors.total == 0
    assert {ch for ch, _ in stream} == {"file", "net", "proc"}
    feed = bp.batches(stream, 512)
    drive = bp._driver(tmp_path)
    assert bp.time_decode(zones, tmp_path, drive, feed, len(stream)) > 0
    rate, events, alerts = bp.time_pipeline(zones, tmp_path, drive, feed, len(stream))
    assert rate > 0 and events > 0.9 * len(stream) and alerts > 0
    spent = bp.time_stages(zones, tmp_path, drive, feed)
    assert set(spent) == set(bp.STAGES) and all(v >= 0 for v in spent.values())
