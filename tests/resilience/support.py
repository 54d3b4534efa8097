"""Helpers shared by the resilience tests: the real agent with every delivery option, its
metrics and resources, and gRPC calls timed."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.agent import AgentProcess, Line
from tests.resilience.conftest import ADMIN
from zonewatch.api.client import Client, open_channel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Agent(AgentProcess):
    """`zonewatch run` with the journal, gRPC (unix socket) and /metrics in `workdir`."""

    def __init__(
        self, workdir: Path, tokens: Path, *args: str, journal: Path | None = None
    ) -> None:
        self.socket = f"unix:{workdir}/zw.sock"
        self.metrics = f"127.0.0.1:{free_port()}"
        super().__init__(
            workdir, "--journal", str(journal or workdir / "journal"), "--tokens", str(tokens),
            "--grpc", self.socket, "--metrics", self.metrics, *args,
        )  # fmt: skip
        self.client = Client(open_channel(self.socket), ADMIN)

    def scrape(self) -> dict[str, float]:
        """/metrics as {name{label=value,...}: value}."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def timed_list_zones(self) -> tuple[float, list[str]]:
        """ListZones' latency (s) and the zone names it answered."""
        t0 = time.monotonic()
        zones = self.client.list_zones(timeout=30)
        return time.monotonic() - t0, [z.ref.name for z in zones]

    def timed_health(self) -> float:
        channel = open_channel(self.socket)
        try:
            t0 = time.monotonic()
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            return time.monotonic() - t0
        finally:
            channel.close()

    def fds(self) -> int:
        return len(list(Path(f"/proc/{self.proc.pid}/fd").iterdir()))

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        self.client.close()
        return super().stop()


def events_of(lines: list[Line], zone: str, channel: str = "file") -> list[Line]:
    return [
        x for x in lines
        if x["type"] == "event" and x["channel"] == channel and x["zone"]["name"] == zone
    ]  # fmt: skip


def grpc_error(exc: BaseException) -> str:
    return exc.code().name if isinstance(exc, grpc.RpcError) else repr(exc)
