from __future__ import annotations

import orjson

from zonewatch.model import FileEvent, Lost, ZoneRef, rfc3339_ns


def test_rfc3339_has_nanoseconds_and_utc() -> None:
    assert rfc3339_ns(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert rfc3339_ns(0) == "1970-01-01T00:00:00.000000000Z"


def test_file_event_json_follows_the_contract() -> None:
    event = FileEvent(
        ts_ns=1_700_000_000_000_000_001,
        zone=ZoneRef("id1", "a", "acme", "qemu"),
        op="rename",
        path="/x",
        host_path="/srv/x",
        pid=5,
        tid=6,
        comm="qemu",
        new_path="/y",
        new_host_path="/srv/y",
        share="share",
    )
    line = orjson.loads(orjson.dumps(event.to_json()))
    assert line["type"] == "event"
    assert line["channel"] == "file"
    assert line["op"] == "rename"
    assert line["zone"] == {"id": "id1", "name": "a", "tenant": "acme", "vmm": "qemu"}
    assert line["file"]["path"] == "/x"
    assert line["file"]["new_path"] == "/y"
    assert line["file"]["host_path"] == "/srv/x"
    assert line["proc"]["pid"] == 5
    assert line["ts"].endswith("000000001Z")


def test_lost_json() -> None:
    assert Lost(0, "file.ringbuf", 3).to_json() == {
        "type": "lost",
        "ts": "1970-01-01T00:00:00.000000000Z",
        "source": "file.ringbuf",
        "count": 3,
    }
