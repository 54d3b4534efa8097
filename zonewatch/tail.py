"""`zonewatch tail`: alerts from a running agent, pretty (rich) or as JSON lines.

Reconnects when the agent goes away and resumes after the last cursor it saw, so a restart
of the agent costs no alert and repeats none.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import grpc
import orjson

from zonewatch.model import Lost, Severity, rfc3339_ns
from zonewatch.options import count, grpc_address, pem_file, sequence_number, text_file
from zonewatch.tui.escape import escape

log = logging.getLogger(__name__)

SEVERITY_STYLE = {
    Severity.INFO: "dim",
    Severity.LOW: "cyan",
    Severity.MEDIUM: "yellow",
    Severity.HIGH: "bold red",
    Severity.CRITICAL: "bold white on red",
}
LOST_REASONS = {
    "retention": "they left the agent's journal before they could be shown",
    "not_written": "the agent's journal disk refused them and the agent stopped (or its "
    "memory backlog was full)",
    "power_loss": "the host restarted before they reached the disk (an upper bound)",
    "damaged": "their records in the agent's journal are damaged",
    "epoch": "the agent's journal is not the one resumed from: replaying it from its start",
    "ahead": "the cursor is past the agent's journal end: replaying it from its start",
}
FATAL = (
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
)


def _token(value: str) -> str:
    """A bearer token, or @FILE holding one (checked: readable UTF-8 text)."""
    if value.startswith("@"):
        text_file(value[1:])
    return value


def add_tail_parser(sub: Any) -> None:
    from zonewatch.api.server import DEFAULT_ADDRESS

    p = sub.add_parser("tail", help="print alerts from a running agent")
    p.add_argument("--server", metavar="ADDR", default=DEFAULT_ADDRESS, type=grpc_address,
                   help="agent's gRPC")  # fmt: skip
    p.add_argument("--tenant", action="append", default=[], help="only this tenant (repeat)")
    p.add_argument("--zone", action="append", default=[], help="only this zone name or id")
    p.add_argument("--min-severity", metavar="S", type=Severity.parse, help="info..critical")
    p.add_argument("--rule", action="append", default=[], help="only this rule (repeat)")
    p.add_argument("--tag", action="append", default=[], help="only alerts with this tag")
    p.add_argument(
        "--since-seq", metavar="N", type=sequence_number, help="replay alerts after seq N first"
    )
    p.add_argument(
        "--token", metavar="T|@FILE", type=_token, help="bearer token (default $ZONEWATCH_TOKEN)"
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--count", metavar="N", type=count, help="exit after N alerts")
    p.add_argument(
        "--tls-ca", metavar="FILE", type=pem_file, help="verify the agent's certificate (TLS)"
    )
    p.add_argument(
        "--tls-cert", metavar="FILE", type=pem_file, help="client certificate (mutual TLS)"
    )
    p.add_argument("--tls-key", metavar="FILE", type=pem_file, help="client key (mutual TLS)")


class Printer:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console: Any = None
        if not as_json:
            from rich.console import Console

            self.console = Console(highlight=False)

    def alert(self, msg: Any) -> None:
        from zonewatch.api.convert import alert_from_pb

        alert = alert_from_pb(msg)
        if self.as_json:
            sys.stdout.buffer.write(orjson.dumps(alert.to_json()) + b"\n")
            sys.stdout.flush()
            return
        from rich.text import Text

        # Guest-chosen text (zone names, paths quoted in summaries) is escaped: raw, a name
        # holding ESC ] 0 ; ... BEL retitled the terminal and a newline forged a line.
        ts = rfc3339_ns(alert.ts_ns)[11:19]
        line = Text()
        line.append(f"{ts} ")
        line.append(f"{str(alert.severity).upper():<8}", SEVERITY_STYLE[alert.severity])
        line.append(f" {escape(alert.zone.tenant, 32)}/{escape(alert.zone.name, 64)} ", "bold")
        line.append(f"{escape(alert.rule, 64)}: ", "magenta")
        line.append(escape(alert.summary, 400))
        line.append(f"  #{alert.seq}", "dim")
        self.console.print(line, overflow="ellipsis", no_wrap=True)

    def lost(self, msg: Any) -> None:
        if self.as_json:
            rec = Lost(time.time_ns(), msg.source, msg.count).to_json()
            rec["reason"] = msg.reason
            if msg.count_unknown:
                rec["count_unknown"] = True
            if msg.last_seq:
                rec["first_seq"], rec["last_seq"] = msg.first_seq, msg.last_seq
                rec["first_available_seq"] = msg.first_available_seq
            sys.stdout.buffer.write(orjson.dumps(rec) + b"\n")
            sys.stdout.flush()
            return
        count = "an unknown number of" if msg.count_unknown else str(msg.count)
        where = f" (#{msg.first_seq}-#{msg.last_seq})" if msg.last_seq else ""
        why = LOST_REASONS.get(msg.reason, msg.reason)
        self.console.print(f"[bold yellow]{count} alert(s) lost[/]{where}: {why}")


def run_tail(args: argparse.Namespace) -> int:
    from zonewatch.api.auth import token_from_env_or_file
    from zonewatch.api.client import Client, Filter, TlsOptions, open_channel

    token = token_from_env_or_file(args.token)
    tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    flt = Filter(tenants=args.tenant, zones=args.zone, min_severity=args.min_severity,
                 rules=args.rule, tags=args.tag)  # fmt: skip
    printer = Printer(args.json)
    position: int | None = args.since_seq
    epoch = ""  # the journal's: a cursor from another journal is told apart
    boot = ""
    shown = 0
    backoff = 0.2
    while True:
        client = Client(open_channel(args.server, tls), token)
        stream = client.subscribe(flt, resume_after_seq=position, resume_epoch=epoch)
        try:
            for msg in stream:
                backoff = 0.2
                if msg.cursor.boot_id != boot:
                    if boot:
                        log.warning("tail: the agent restarted; resuming after #%d", position)
                    boot = msg.cursor.boot_id
                position, epoch = msg.cursor.seq, msg.cursor.epoch
                kind = msg.WhichOneof("msg")
                if kind == "alert":
                    printer.alert(msg.alert)
                    shown += 1
                    if args.count is not None and shown >= args.count:
                        return 0
                elif kind == "lost":
                    printer.lost(msg.lost)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in FATAL:
                print(
                    f"zonewatch tail: {args.server}: {escape(exc.details() or '')}", file=sys.stderr
                )
                return 2
            log.warning("tail: %s (%s); reconnecting", args.server, code.name.lower())
        finally:
            stream.cancel()
            client.close()
        time.sleep(backoff)  # between reconnects: no event to wait for but time
        backoff = min(backoff * 2, 5.0)
