"""The command line (shared/design.md). Every failure is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orjson

from zonewatch import __version__
from zonewatch.errors import ConfigError, ZonewatchError
from zonewatch.inventory import Inventory
from zonewatch.inventory.platform import CRI_BUNDLE_ROOT, CriBundles
from zonewatch.inventory.tenants import TenantMap, TenantsFile, load_tenants
from zonewatch.options import count, factor, output_file, seconds
from zonewatch.tui.escape import escape

log = logging.getLogger("zonewatch")


class TerminalFormatter(logging.Formatter):
    """Log lines as the terminal must show them: a message that quotes guest text (a zone
    name, a path) is escaped like every other output (zonewatch.tui.escape); a traceback
    after it is the agent's own and stays as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message, 2000)
        return super().formatMessage(record)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, naming the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _share_mount(value: str) -> tuple[str, str]:
    tag, sep, path = value.partition("=")
    if not sep or not tag or not path.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected TAG=/guest/path, got {value!r}")
    return tag, path


def _add_inventory_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tenants", metavar="FILE", help="tenants file (YAML): zone globs/labels -> tenant"
    )
    p.add_argument(
        "--share-mount",
        metavar="TAG=PATH",
        type=_share_mount,
        action="append",
        default=[],
        help="where guests mount the share TAG (default: its root is /)",
    )
    p.add_argument(
        "--cri-bundles",
        metavar="DIR",
        default=str(CRI_BUNDLE_ROOT),
        help="containerd's bundles of Kubernetes sandboxes (k8s labels of Kata zones; "
        "default: %(default)s)",
    )


def _add_rules_commands(sub: Any) -> None:
    """record, replay and rules (check, test, fields)."""
    record = sub.add_parser("record", help="capture events (the agent's JSON lines) to a file")
    _add_inventory_options(record)
    record.add_argument(
        "--out", metavar="FILE", required=True, type=output_file, help="JSON lines to append to"
    )
    record.add_argument("--duration", metavar="S", type=seconds, help="stop after S seconds")
    record.set_defaults(flow_idle=30.0, stats_interval=1.0, no_stats=False, rules=[])

    replay = sub.add_parser("replay", help="run a recording through the rules")
    replay.add_argument("file", metavar="FILE", help="a recording (JSON lines; - for stdin)")
    replay.add_argument("--rules", metavar="PATH", action="append", default=[],
                        help="rule files or directories (default: rules/)")  # fmt: skip
    replay.add_argument("--jsonl", metavar="FILE|-", default="-", type=output_file,
                        help="alerts to (default -)")  # fmt: skip
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--speed", metavar="X", type=factor,
                      help="replay at X times the recorded pace")  # fmt: skip
    pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")

    rules = sub.add_parser("rules", help="check and test rule files")
    rules_sub = rules.add_subparsers(
        dest="rules_command", required=True, parser_class=OneLineParser
    )
    rules_check = rules_sub.add_parser("check", help="exit 0 when valid; else file:line:col: ...")
    rules_check.add_argument("paths", metavar="PATH", nargs="+")
    rules_test = rules_sub.add_parser("test", help="run the rules' fixtures")
    rules_test.add_argument("paths", metavar="PATH", nargs="+")
    rules_test.add_argument("--verbose", dest="list_all", action="store_true",
                            help="list passing fixtures too")  # fmt: skip
    rules_sub.add_parser("fields", help="the fields rules can name (Markdown)")


def _add_lab_commands(sub: Any) -> None:
    from zonewatch.lab import cli as lab_cli

    lab = sub.add_parser("lab", help="real zones for demos and tests")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, parser_class=OneLineParser)
    up = lab_sub.add_parser("up", help="boot lab zones (detached)")
    up.add_argument(
        "--zones", type=count, default=2, metavar="N", help="how many zones (default 2)"
    )
    up.add_argument("--workload", metavar="FILE", help="busybox sh script each zone runs")
    lab_cli.add_layout_option(up)
    lab_sub.add_parser("down", help="stop every lab zone and remove what they left")
    lab_cli.add_json_option(lab_sub.add_parser("status", help="the lab's zones"))
    lab_run = lab_sub.add_parser("run", help="boot one zone, run a workload, show its console")
    lab_run.add_argument("workload", metavar="FILE", help="busybox sh script")
    lab_run.add_argument("--name", default="zone-run")
    lab_run.add_argument("--tenant", default="default")
    lab_run.add_argument("--timeout", type=seconds, default=120.0)
    lab_cli.add_layout_option(lab_run)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="zonewatch", description="Watch VM-isolated workloads from the host."
    )
    parser.add_argument("--version", action="version", version=f"zonewatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser("run", help="run the agent")
    _add_inventory_options(run)
    run.add_argument("--jsonl", metavar="FILE|-", type=output_file,
                     help="write JSON lines (alerts, lost, events)")  # fmt: skip
    run.add_argument("--events", action="store_true", help="also emit every raw event")
    run.add_argument("--duration", metavar="S", type=seconds, help="stop after S seconds")
    run.add_argument(
        "--flow-idle",
        metavar="S",
        type=seconds,
        default=30.0,
        help="a flow quiet for S seconds has ended (default 30)",
    )
    run.add_argument(
        "--stats-interval",
        metavar="S",
        type=seconds,
        default=1.0,
        help="per-zone stats every S seconds (default 1)",
    )
    run.add_argument("--no-stats", action="store_true", help="no `stats` lines in the output")
    run.add_argument("--tui", action="store_true", help="show the live UI (zonewatch top) too")
    run.add_argument(
        "--kvm-detail",
        action="store_true",
        help="also count emulated instructions and VMM time per exit (costs zones more)",
    )
    run.add_argument(
        "--file-hooks",
        choices=("tracepoints", "uprobes"),
        default="tracepoints",
        help="file channel: syscall tracepoints (default; no bypass, but every syscall on the "
        "host takes the slow path) or uprobes on each zone process's libc (only zone "
        "processes pay; a raw syscall bypasses them)",
    )
    run.add_argument(
        "--proc-syscalls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="proc channel: also ptrace, mount, set*id, modules, bpf, connect... through "
        "syscall tracepoints (slow path for every syscall on the host); "
        "--no-proc-syscalls keeps exec, fork and exit only",
    )
    run.add_argument(
        "--rules",
        metavar="PATH",
        action="append",
        default=[],
        help="rule files or directories (repeatable); reloaded on change and on SIGHUP",
    )

    _add_rules_commands(sub)

    zones = sub.add_parser("zones", help="the zones on this host now")
    _add_inventory_options(zones)
    zones.add_argument("--json", action="store_true", help="JSON instead of a table")

    _add_lab_commands(sub)

    audit = sub.add_parser("audit", help="isolation findings for each zone")
    _add_inventory_options(audit)
    audit.add_argument("--json", action="store_true", help="JSON instead of a table")

    sub.add_parser("doctor", help="preflight: what will and won't attach here, and why")
    from zonewatch.delivery import add_options as add_delivery_options
    from zonewatch.tail import add_tail_parser

    add_delivery_options(run)  # --journal --grpc --tokens --tls-* --otlp --metrics --ocsf
    add_tail_parser(sub)
    from zonewatch.tui.cli import add_top_parser

    add_top_parser(sub)
    return parser


def _tenants(args: argparse.Namespace) -> TenantMap:
    return load_tenants(args.tenants) if args.tenants else TenantMap.empty()


def _inventory(args: argparse.Namespace, tenants: TenantMap | None = None) -> Inventory:
    platform = CriBundles(Path(args.cri_bundles))
    return Inventory(
        _tenants(args) if tenants is None else tenants, dict(args.share_mount), platform=platform
    )


def stop_on_signal(stop: threading.Event) -> Callable[[int, Any], None]:
    """The agent's SIGINT/SIGTERM handler: log and set `stop`. A child forked from the agent
    inherits it (pyroute2 forks one to enter a pod's network namespace, and SIGTERMs it when
    done): there it exits at once, as the default action would, instead of logging that the
    agent stops and living on."""
    agent_pid = os.getpid()

    def on_signal(signum: int, _frame: Any) -> None:
        if os.getpid() != agent_pid:
            os._exit(128 + signum)
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    return on_signal


def cmd_run(args: argparse.Namespace) -> int:
    from zonewatch.agent import Agent, AgentOptions
    from zonewatch.exporters.base import Sink
    from zonewatch.exporters.jsonl import JsonlSink
    from zonewatch.probes.file import FileProbe
    from zonewatch.probes.kvm import KVM_TRACEPOINTS, LEAN_TRACEPOINTS, KvmProbe
    from zonewatch.probes.net import NetProbe
    from zonewatch.probes.proc import ProcProbe
    from zonewatch.probes.sched import SchedProbe

    tenants_file = TenantsFile(args.tenants) if args.tenants else None
    inventory = _inventory(args, tenants_file.tenants if tenants_file else None)
    rules = None
    if args.rules:
        from zonewatch.rules.engine import RuleSet

        rules = RuleSet(args.rules)
    sinks: list[Sink] = [JsonlSink(args.jsonl)] if args.jsonl else []
    tui = None
    if getattr(args, "tui", False):  # one more sink (alerts; events with --events)
        from zonewatch.tui.feed import LocalFeed

        tui = LocalFeed(lambda: agent.latest_stats)
        sinks.append(tui)
    from zonewatch import delivery as delivery_mod

    # Alerts: journal, then gRPC subscribers, OTLP, OCSF, Prometheus and the JSONL sink.
    delivery = delivery_mod.build(delivery_mod.config_from_args(args), sinks)
    agent = Agent(
        inventory,
        [
            FileProbe(hooks=getattr(args, "file_hooks", "tracepoints")),
            KvmProbe(tracepoints=KVM_TRACEPOINTS if args.kvm_detail else LEAN_TRACEPOINTS),
            SchedProbe(),
            NetProbe(idle_timeout_s=args.flow_idle),
            ProcProbe(syscalls=getattr(args, "proc_syscalls", True)),
        ],
        sinks,
        AgentOptions(
            emit_events=args.events,
            emit_stats=not args.no_stats,
            duration=args.duration,
            stats_interval=args.stats_interval,
        ),
        rules=rules,
        tenants=tenants_file,
    )
    stop = threading.Event()
    on_signal = stop_on_signal(stop)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    reloadable = [f for f in (rules, tenants_file) if f is not None]
    if reloadable:

        def on_hup(_signum: int, _frame: Any) -> None:
            for followed in reloadable:  # each only sets a flag; the loop reloads
                followed.request_reload()

        signal.signal(signal.SIGHUP, on_hup)
    agent.delivery = delivery
    delivery_mod.watch_agent(delivery, agent)
    if tui is not None:
        from zonewatch.tui.cli import run_agent_tui

        return run_agent_tui(agent, tui, stop, args.stats_interval)
    agent.run(stop)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    """The agent writing every event (and stats, lost) as JSON lines: a replayable file."""
    args.jsonl = args.out
    args.events = True
    return cmd_run(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from zonewatch.exporters.jsonl import JsonlSink
    from zonewatch.rules.engine import RuleEngine
    from zonewatch.rules.replay import replay

    engine = RuleEngine.load(args.rules or ["rules"])
    sink = JsonlSink(args.jsonl)
    try:
        if args.file == "-":
            counters = replay(engine, sys.stdin.buffer, "<stdin>", sink.export, args.speed)
        else:
            with open(args.file, "rb") as stream:
                counters = replay(engine, stream, args.file, sink.export, args.speed)
    finally:
        sink.shutdown()
    log.info("replayed %d record(s): %d alert(s)", counters.records, counters.alerts)
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from zonewatch.rules import cli as rules_cli

    if args.rules_command == "check":
        return rules_cli.check_rules(args.paths, sys.stdout)
    if args.rules_command == "test":
        return rules_cli.run_fixtures(args.paths, sys.stdout, verbose=args.list_all)
    return rules_cli.print_fields(sys.stdout)


def cmd_zones(args: argparse.Namespace) -> int:
    from zonewatch import coverage

    inventory = _inventory(args)
    inventory.refresh()
    zones = sorted(inventory.zones.values(), key=lambda z: (z.tenant, z.name))
    covered = list(zip(zones, coverage.standalone(zones), strict=True))
    if args.json:
        listed = [z.to_json() | {"coverage": c.to_json()} for z, c in covered]
        sys.stdout.buffer.write(orjson.dumps(listed, option=orjson.OPT_INDENT_2))
        sys.stdout.write("\n")
        return 0
    print(f"{'NAME':<20} {'TENANT':<10} {'VMM':<10} {'PID':>7} {'VCPUS':>5} {'TAPS':<10} BLIND")
    for z, c in covered:
        blind = " ".join(f"{v.channel}:{v.reason}" for v in c.blind()) or "-"
        print(
            f"{escape(z.name, 20):<20} {escape(z.tenant, 10):<10} {z.vmm[:10]:<10} {z.pid:>7} "
            f"{len(z.vcpu_tids):>5} {escape(','.join(z.taps), 10):<10} {blind}"
        )
    for z, c in covered:
        for v in c.blind():
            print(f"{escape(z.name, 256)}: {v.channel} blind ({v.reason}): {escape(v.detail, 400)}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from zonewatch.lab import cli as lab_cli

    return lab_cli.main(args)


def cmd_audit(args: argparse.Namespace) -> int:
    from zonewatch.audit import audit, findings_table

    inventory = _inventory(args)
    inventory.refresh()
    findings = audit(list(inventory.zones.values()))
    if args.json:
        sys.stdout.buffer.write(
            orjson.dumps([f.to_json() for f in findings], option=orjson.OPT_INDENT_2)
        )
        sys.stdout.write("\n")
    else:
        findings_table(findings, len(inventory.zones))
    return 0


def cmd_doctor(_args: argparse.Namespace) -> int:
    from zonewatch.doctor import run_doctor

    return run_doctor()


COMMANDS = {
    "run": cmd_run,
    "zones": cmd_zones,
    "lab": cmd_lab,
    "doctor": cmd_doctor,
    "audit": cmd_audit,
    "record": cmd_record,
    "replay": cmd_replay,
    "rules": cmd_rules,
}


def cmd_tail(args: argparse.Namespace) -> int:
    from zonewatch.tail import run_tail

    return run_tail(args)


COMMANDS["tail"] = cmd_tail


def cmd_top(args: argparse.Namespace) -> int:
    from zonewatch.tui.cli import run_top

    return run_top(args)


COMMANDS["top"] = cmd_top


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = " ".join(
            str(part) for part in (args.command, getattr(args, "lab_command", None)) if part
        )
        parser.exit(
            2,
            f"zonewatch {command}: error: unrecognized arguments: {' '.join(unknown)} "
            f"(see zonewatch {command} --help)\n",
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TerminalFormatter("zonewatch: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    try:
        return COMMANDS[args.command](args)
    except ZonewatchError as exc:
        print(f"zonewatch {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None:  # not a file the command was pointed at: a real fault
            raise
        # A file named on the command line (or in a file it names) that cannot be used.
        what = exc.strerror or str(exc)
        print(f"zonewatch {args.command}: {ConfigError(escape(str(exc.filename), 200), what)}",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
