"""OTLP configured by the standard variables, signal-specific ones included, as the
OpenTelemetry SDK documents them: which endpoint, protocol, headers and timeout each signal's
real SDK exporter ends up with, and a real OTLP receiver (gRPC, on loopback) getting an alert
from a sink configured by OTEL_EXPORTER_OTLP_LOGS_ENDPOINT alone."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.alerts import make_alert
from tests.helpers.otlp_receiver import OtlpReceiver, attrs
from zonewatch.delivery import DeliveryConfig, build
from zonewatch.errors import ConfigError
from zonewatch.exporters import otel_env
from zonewatch.exporters.otlp import OtlpConfig, OtlpSink

pytestmark = pytest.mark.unit
GRPC = "opentelemetry.exporter.otlp.proto.grpc"
HTTP = "opentelemetry.exporter.otlp.proto.http"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* variable of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def sinks() -> Iterator[list[OtlpSink]]:
    made: list[OtlpSink] = []
    yield made
    for sink in made:
        sink.shutdown()


def sink_of(sinks: list[OtlpSink], config: OtlpConfig | None = None) -> OtlpSink:
    sink = OtlpSink(config or OtlpConfig(timeout_s=None))
    sinks.append(sink)
    return sink


def where(sink: OtlpSink) -> dict[str, tuple[str, str]]:
    """signal -> (the exporter's package: grpc or http, the endpoint it resolved)."""
    return {
        signal: (type(e).__module__.split(".")[4], sink.endpoints[signal])
        for signal, e in sink.exporters.items()
    }


def test_a_signal_endpoint_alone_turns_otlp_on_and_other_signals_keep_the_default(
    monkeypatch: pytest.MonkeyPatch, sinks: list[OtlpSink]
) -> None:
    assert not otel_env.configured(os.environ)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://logs.invalid:4317")
    assert otel_env.configured(os.environ)
    got = where(sink_of(sinks))
    assert got["logs"] == ("grpc", "logs.invalid:4317")
    assert got["traces"] == ("grpc", "localhost:4317")  # the SDK's default
    assert got["metrics"] == ("grpc", "localhost:4317")


def test_http_signal_endpoint_is_used_as_is_and_the_generic_one_gets_the_signal_path(
    monkeypatch: pytest.MonkeyPatch, sinks: list[OtlpSink]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.invalid:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces.invalid:9999/in")
    assert where(sink_of(sinks)) == {
        "logs": ("http", "http://collector.invalid:4318/v1/logs"),
        "traces": ("http", "http://traces.invalid:9999/in"),
        "metrics": ("http", "http://collector.invalid:4318/v1/metrics"),
    }


def test_a_signal_protocol_wins_over_the_generic_one(
    monkeypatch: pytest.MonkeyPatch, sinks: list[OtlpSink]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.invalid:4317")
    got = where(sink_of(sinks))
    assert got["logs"] == got["traces"] == ("grpc", "collector.invalid:4317")
    assert got["metrics"] == ("http", "http://collector.invalid:4317/v1/metrics")


def test_the_command_line_wins_over_every_variable(
    monkeypatch: pytest.MonkeyPatch, sinks: list[OtlpSink]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://logs.invalid:4318/x")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "grpc")
    config = OtlpConfig("http://cli.invalid:4318/", "http/protobuf")
    assert where(sink_of(sinks, config)) == {
        s: ("http", f"http://cli.invalid:4318/v1/{s}") for s in ("logs", "traces", "metrics")
    }


class HttpCollector:
    """A real OTLP/HTTP endpoint on loopback that records each request's path and headers
    (and answers with an empty, valid export response)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with collector.lock:
                    collector.requests.append((self.path, {k.lower(): v for k, v in
                                                           self.headers.items()}))  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def seen(self) -> dict[str, str]:
        """path -> the x-tenant header of the requests so far."""
        with self.lock:
            return {path: h.get("x-tenant", "") for path, h in self.requests}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_signal_endpoints_and_headers_reach_a_real_collector(
    monkeypatch: pytest.MonkeyPatch, sinks: list[OtlpSink]
) -> None:
    collector = HttpCollector()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{collector.url}/custom/traces")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=all")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "x-tenant=siem")
    try:
        sink = sink_of(sinks)
        sink.export([make_alert(1)])
        sink.flush()
        deadline = time.monotonic() + 10
        while len(collector.seen()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert collector.seen() == {
            "/v1/logs": "siem",
            "/custom/traces": "all",
            "/v1/metrics": "all",
        }
    finally:
        for sink in sinks:  # while the collector still answers: no retries at exit
            sink.shutdown()
        sinks.clear()
        collector.close()


def test_a_signal_set_to_none_is_not_exported(
    monkeypatch: pytest.MonkeyPatch, sinks: list[OtlpSink]
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.invalid:4317")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console, otlp")
    assert set(sink_of(sinks).exporters) == {"logs", "metrics"}


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"), ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "http")],
)
def test_a_bad_protocol_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"^{variable}: '{value}': expected one of grpc"):
        otel_env.signal_targets(None, None, os.environ)


def test_delivery_builds_the_otlp_sink_from_a_signal_variable_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://metrics.invalid:4317")
    delivery = build(DeliveryConfig(journal=str(tmp_path / "journal")))
    try:
        (sink,) = [s for s in delivery.sinks if isinstance(s, OtlpSink)]
        assert sink.endpoints["metrics"] == "metrics.invalid:4317"
    finally:
        delivery.close()


def test_an_alert_reaches_a_receiver_named_by_the_logs_variable_alone(
    monkeypatch: pytest.MonkeyPatch, sinks: list[OtlpSink]
) -> None:
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_INSECURE", "true")
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        sink = sink_of(sinks)
        sink.export([make_alert(1)])
        sink.flush()
        receiver.wait_for(lambda: bool(receiver.logs), 10, "the alert's log record")
        _resource, record = receiver.logs[0]
        assert attrs(record.attributes)["security_rule.name"] == "test_rule"
        assert record.event_name == "zonewatch.alert"
        assert not receiver.spans and set(sink.exporters) == {"logs"}
