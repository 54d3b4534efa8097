"""Where each OTLP signal goes, by the standard variables as the OpenTelemetry SDK documents
them (kept apart from exporters.otlp so deciding whether to export costs no SDK import).

Per signal (logs, traces, metrics), first match wins:
- protocol: `--otlp-protocol`, `OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL`,
  `OTEL_EXPORTER_OTLP_PROTOCOL`, grpc.
- endpoint: `--otlp` (for http/protobuf with `/v1/<signal>` appended), then what the SDK's
  exporter resolves itself: `OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT` as is,
  `OTEL_EXPORTER_OTLP_ENDPOINT` (http/protobuf: with `/v1/<signal>` appended), its default.
- headers, timeout, compression, certificates (and, for gRPC, insecure): the SDK reads
  `OTEL_EXPORTER_OTLP_<SIGNAL>_*`, then `OTEL_EXPORTER_OTLP_*`.
A signal whose `OTEL_<SIGNAL>_EXPORTER` is set without `otlp` in it (e.g. `none`) is not
exported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from zonewatch.errors import ConfigError

SIGNALS = ("logs", "traces", "metrics")
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_PROTOCOL = "grpc"
GENERIC = "OTEL_EXPORTER_OTLP_"


def signal_variable(signal: str, name: str) -> str:
    """OTEL_EXPORTER_OTLP_<SIGNAL>_<NAME>, e.g. OTEL_EXPORTER_OTLP_LOGS_ENDPOINT."""
    return f"{GENERIC}{signal.upper()}_{name}"


ENDPOINT_VARIABLES = (f"{GENERIC}ENDPOINT", *(signal_variable(s, "ENDPOINT") for s in SIGNALS))


def configured(environ: Mapping[str, str]) -> bool:
    """Whether the environment names an OTLP endpoint for any signal."""
    return any(environ.get(name) for name in ENDPOINT_VARIABLES)


@dataclass(frozen=True, slots=True)
class SignalTarget:
    signal: str  # logs, traces or metrics
    protocol: str  # grpc or http/protobuf
    # The endpoint to give the SDK's exporter; None: it resolves the variables itself.
    endpoint: str | None


def _exported(signal: str, environ: Mapping[str, str]) -> bool:
    chosen = environ.get(f"OTEL_{signal.upper()}_EXPORTER")
    return chosen is None or "otlp" in {e.strip() for e in chosen.split(",")}


def _protocol(signal: str, protocol: str | None, environ: Mapping[str, str]) -> str:
    for where, value in (
        ("--otlp-protocol", protocol),
        (signal_variable(signal, "PROTOCOL"), environ.get(signal_variable(signal, "PROTOCOL"))),
        (f"{GENERIC}PROTOCOL", environ.get(f"{GENERIC}PROTOCOL")),
    ):
        if value:
            if value not in PROTOCOLS:
                raise ConfigError(where, f"{value!r}: expected one of {', '.join(PROTOCOLS)}")
            return value
    return DEFAULT_PROTOCOL


def signal_targets(
    endpoint: str | None, protocol: str | None, environ: Mapping[str, str]
) -> list[SignalTarget]:
    """The signals to export and how (`endpoint`, `protocol`: the command line's)."""
    out: list[SignalTarget] = []
    for signal in SIGNALS:
        if not _exported(signal, environ):
            continue
        chosen = _protocol(signal, protocol, environ)
        given = endpoint
        if endpoint and chosen == "http/protobuf":
            given = f"{endpoint.rstrip('/')}/v1/{signal}"
        out.append(SignalTarget(signal, chosen, given or None))
    return out
