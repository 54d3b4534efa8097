"""`zonewatch top` and `zonewatch run --tui`: the command-line side of the UI, called from
zonewatch.cli (the only module outside zonewatch.tui that imports it)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any

from zonewatch.tui.feed import Feed, GrpcFeed, LocalFeed, ReplayFeed
from zonewatch.tui.state import ViewState


def _interval(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.05 <= number <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.05 and 3600: {value!r}")
    return number


def add_top_parser(sub: Any) -> None:
    from zonewatch.api.server import DEFAULT_ADDRESS

    p = sub.add_parser("top", help="live terminal UI of a running agent's zones and alerts")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--server",
        metavar="ADDR",
        default=DEFAULT_ADDRESS,
        help=f"the agent's gRPC address (default {DEFAULT_ADDRESS})",
    )
    source.add_argument(
        "--replay",
        metavar="FILE",
        help="show a recording (zonewatch run --jsonl) instead of an agent",
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="T|@FILE", help="bearer token (default $ZONEWATCH_TOKEN)")
    token.add_argument("--token-file", metavar="FILE", help="read the bearer token from FILE")
    p.add_argument(
        "--interval",
        metavar="S",
        type=_interval,
        default=1.0,
        help="refresh every S seconds (default 1)",
    )
    p.add_argument("--once", action="store_true", help="print one table (rich, no keys) and exit")
    p.add_argument(
        "--wait",
        metavar="S",
        type=_interval,
        default=5.0,
        help="--once: wait up to S seconds for the agent's stats (default 5)",
    )
    p.add_argument("--tls-ca", metavar="FILE", help="verify the agent's certificate (TLS)")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="FILE", help="client key (mutual TLS)")


def _feed(args: argparse.Namespace) -> Feed:
    if args.replay:
        return ReplayFeed(args.replay, step=not args.once)
    from zonewatch.api.auth import token_from_env_or_file
    from zonewatch.api.client import TlsOptions

    token = token_from_env_or_file(f"@{args.token_file}" if args.token_file else args.token)
    tls = TlsOptions(args.tls_ca, args.tls_cert, args.tls_key) if args.tls_ca else None
    return GrpcFeed(args.server, token, tls=tls)


def run_top(args: argparse.Namespace) -> int:
    feed = _feed(args)
    if args.once:
        try:
            return _once(feed, args.wait)
        finally:
            feed.close()
    from zonewatch.tui.app import TopApp

    TopApp(feed, args.interval).run()  # closes the feed on unmount
    return 0


def _once(feed: Feed, wait: float) -> int:
    """One rich table on stdout. The agent sends its current snapshot on connect (empty
    before its first interval): wait for one that names zones, or for `wait` seconds."""
    from rich.console import Console

    from zonewatch.tui.render import once_table

    state = ViewState()
    deadline = time.monotonic() + wait
    while True:
        state.apply(feed.poll(timeout=max(0.0, min(0.2, deadline - time.monotonic()))))
        if state.zones or time.monotonic() >= deadline:
            break
    if not state.snapshots:
        reason = state.status or f"no stats from {feed.source} within {wait:g}s"
        print(f"zonewatch top: {reason.split(', retrying')[0]}", file=sys.stderr)
        return 2
    Console(highlight=False).print(once_table(state, feed.source))
    return 0


def run_agent_tui(agent: Any, feed: LocalFeed, stop: threading.Event, interval: float) -> int:
    """`zonewatch run --tui`: the agent's loop in a thread, the UI in this one reading it
    through `feed` (already one of the agent's sinks). Quitting the UI stops the agent; the
    agent stopping (--duration, a failure) ends the UI. The agent's log lines go to the
    status line: written to the terminal they would tear the screen."""
    from zonewatch.tui.app import TopApp

    failure: list[BaseException] = []

    def work() -> None:
        try:
            agent.run(stop)
        except BaseException as exc:  # re-raised below, in the main thread
            failure.append(exc)
        finally:
            feed.mark_finished()

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [feed.log_handler()]
    thread = threading.Thread(target=work, name="zw-agent")
    thread.start()
    try:
        TopApp(feed, interval).run()
    finally:
        stop.set()
        thread.join()
        root.handlers[:] = saved
    if failure:
        raise failure[0]
    return 0


__all__ = ["add_top_parser", "run_agent_tui", "run_top"]
