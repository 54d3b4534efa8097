"""A real OTLP/gRPC receiver for tests, built from opentelemetry-proto's service definitions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs}


class OtlpReceiver:
    def __init__(self, port: int = 0) -> None:
        self.logs: list[Any] = []  # (resource attrs, LogRecord)
        self.spans: list[Any] = []  # (resource attrs, Span)
        self.metrics: list[Any] = []  # (resource attrs, Metric)
        self._cond = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        receiver = self

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._add(
                    receiver.logs,
                    [
                        (attrs(rl.resource.attributes), rec)
                        for rl in request.resource_logs
                        for sl in rl.scope_logs
                        for rec in sl.log_records
                    ],
                )
                return logs_service_pb2.ExportLogsServiceResponse()

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._add(
                    receiver.spans,
                    [
                        (attrs(rs.resource.attributes), span)
                        for rs in request.resource_spans
                        for ss in rs.scope_spans
                        for span in ss.spans
                    ],
                )
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._add(
                    receiver.metrics,
                    [
                        (attrs(rm.resource.attributes), m)
                        for rm in request.resource_metrics
                        for sm in rm.scope_metrics
                        for m in sm.metrics
                    ],
                )
                return metrics_service_pb2.ExportMetricsServiceResponse()

        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self._server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        assert self.port, f"cannot listen on 127.0.0.1:{port}"
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _add(self, into: list[Any], items: list[Any]) -> None:
        with self._cond:
            into.extend(items)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"OTLP receiver: timed out waiting for {what} "
                        f"({len(self.logs)} logs, {len(self.spans)} spans, "
                        f"{len(self.metrics)} metrics)"
                    )
                self._cond.wait(left)

    def stop(self) -> None:
        self._server.stop(0).wait()

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
