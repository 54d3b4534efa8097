"""Hostile strings from a real source through the real agent and every sink: a micro-VMM
zone whose name (its VMM command line) holds terminal escape sequences, a C1 control, a
bidi override, invalid UTF-8 bytes and 120 000 more characters, and whose file backend
writes into a folder whose name holds the same kinds of bytes. JSON lines, the journal,
OCSF, gRPC (ListZones, Subscribe), OTLP, Prometheus and `zonewatch top --once` all keep
working: valid UTF-8 and JSON/proto/exposition format, no raw ESC byte in any output, zone
names escaped and bounded; paths keep their characters as (JSON-escaped) data."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers.otlp_receiver import OtlpReceiver, attrs
from tests.resilience.conftest import ADMIN
from tests.resilience.support import Agent, events_of
from zonewatch.journal import decode
from zonewatch.lab.microvm import MicroVmProcess

ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x9b31m\u202eevil\r\n"
INVALID_UTF8 = os.fsdecode(b"\xff\xfe\xc3")  # surrogate-escaped, as argv and paths decode
NAME = f"hostile-{ESCAPES}{INVALID_UTF8}-" + "A" * 120_000
DIR = f"files-{ESCAPES}{INVALID_UTF8}"
NAME_LIMIT = 256  # zone names are cut here after escaping (zonewatch.inventory.cmdline)
RAW = ("\x1b", "\x07", "\x9b", "\u202e", "\r", "\n")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def agent(
    tmp_path: Path, tokens_file: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Agent]:
    monkeypatch.setenv("OTEL_BLRP_SCHEDULE_DELAY", "200")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "1000")
    root = Path(__file__).resolve().parents[2]
    a = Agent(
        tmp_path, tokens_file, "--events", "--rules", str(root / "rules"),
        "--ocsf", str(tmp_path / "ocsf.jsonl"), "--otlp", receiver.endpoint,
    )  # fmt: skip
    try:
        yield a
    finally:
        a.stop()


def is_hostile(name: str) -> bool:
    return name.startswith("hostile-")


def assert_neutral(text: str, what: str) -> None:
    """Printable, bounded, with the escapes made visible."""
    assert not any(c in text for c in RAW), f"{what}: raw control in {text[:80]!r}"
    assert text.isprintable(), f"{what}: {text[:80]!r}"
    assert len(text) <= NAME_LIMIT, f"{what}: {len(text)} characters"
    assert "\\x1b[2J" in text, f"{what}: {text[:80]!r}"


def valid_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines file: valid UTF-8, valid JSON, no raw ESC byte."""
    data = path.read_bytes()
    assert b"\x1b" not in data, f"{path.name}: a raw ESC byte"
    data.decode("utf-8")  # strict
    return [orjson.loads(line) for line in data.splitlines()]


def test_hostile_names_and_paths_pass_safely_through_every_sink(
    agent: Agent, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    files = tmp_path / DIR
    files.mkdir()
    vm = MicroVmProcess(NAME, rate=20, file_dir=files, stats=tmp_path / "vm.json").start()
    try:
        agent.wait_for(
            lambda lines: len([x for x in lines if x["type"] == "event"
                               and is_hostile(x["zone"]["name"])]) >= 10
            and any(x["type"] == "alert" and is_hostile(x["zone"]["name"]) for x in lines),
            30, "the hostile zone's events and alerts",
        )  # fmt: skip
        zones = [z for z in agent.client.list_zones(timeout=30) if is_hostile(z.ref.name)]
        stream = agent.client.subscribe(resume_after_seq=0, timeout=30)
        alert = next(m.alert for m in stream if m.WhichOneof("msg") == "alert"
                     and is_hostile(m.alert.zone.name))  # fmt: skip
        stream.cancel()
        receiver.wait_for(
            lambda: any(is_hostile(str(attrs(r.attributes).get("zonewatch.zone.name", "")))
                        for _, r in receiver.logs),
            30, "the alert's OTLP log record",
        )  # fmt: skip
        scraped = agent.scrape()
        top = subprocess.run(
            [sys.executable, "-m", "zonewatch", "top", "--once", "--server", agent.socket,
             "--token", ADMIN, "--wait", "10"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        vm.close()
    lines = agent.read()
    name = next(
        x["zone"]["name"] for x in lines if x["type"] == "event" and is_hostile(x["zone"]["name"])
    )
    assert_neutral(name, "JSONL zone name")
    assert "\\xff\\xfe\\xc3" in name  # invalid UTF-8 shown as its bytes
    # File events: paths keep what the folder is named (control characters are data, escaped
    # by the JSON encoder: no raw ESC byte in the file, see valid_lines), invalid UTF-8 as
    # its bytes.
    paths = [
        x["file"]["host_path"] for x in events_of(lines, name) if "/blk-" in x["file"]["host_path"]
    ]
    assert paths and all(f"{ESCAPES}\\xff\\xfe\\xc3/blk-" in p for p in paths), paths[:2]
    assert max(len(line) for line in (tmp_path / "agent.jsonl").read_bytes().splitlines()) < 16384
    valid_lines(tmp_path / "agent.jsonl")
    ocsf = [f for f in valid_lines(tmp_path / "ocsf.jsonl") if "hostile-" in str(f)]
    assert ocsf, "no OCSF finding for the hostile zone"
    journal = [decode(line) for seg in sorted((tmp_path / "journal").glob("*.seg"))
               for line in seg.read_bytes().splitlines()]  # fmt: skip
    assert any(a.zone.name == name for a in journal)
    assert [z.ref.name for z in zones] == [name]
    assert alert.zone.name == name and alert.seq > 0
    otlp_names = {str(attrs(r.attributes).get("zonewatch.zone.name")) for _, r in receiver.logs}
    assert name in otlp_names
    labels = [k for k in scraped if "hostile-" in k]
    assert labels, "no series for the hostile zone"
    assert all("\x1b" not in k and "\n" not in k for k in labels)
    assert scraped["zonewatch_rule_eval_seconds_count"] > 0  # the rules ran, and were timed
    assert top.returncode == 0, top.stderr.decode(errors="replace")
    assert b"\x1b]0;" not in top.stdout and b"\x1b[2J" not in top.stdout
    assert b"hostile-" in top.stdout
    assert agent.proc.poll() is None
    print(
        f"zone name {len(NAME)} chars -> {len(name)}: {name[:60]!r}...; "
        f"{len(paths)} file events, {len(ocsf)} OCSF findings, {len(labels)} series"
    )
