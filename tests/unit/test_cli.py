"""Bad input at the command line ends in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest


def zonewatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zonewatch", *args], capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["run", "--bogus"], ["zonewatch run", "--bogus"]),
        (["zones", "--json", "--nope"], ["zonewatch zones", "--nope"]),
        (["frobnicate"], ["invalid choice", "frobnicate"]),
        (["run", "--duration", "-3"], ["--duration", "must be > 0"]),
        (["run", "--share-mount", "nonsense"], ["--share-mount", "TAG=/guest/path"]),
        ([], ["required"]),
    ],
)
def test_usage_errors(args: list[str], needles: list[str]) -> None:
    assert_one_line_error(zonewatch(*args), *needles)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("version: 1\ntenants:\n  - name: acme\n    zones: [unclosed\n", ":"),
        ("version: 1\ntenants:\n  - zones: ['a-*']\n", "name"),
        ("version: 2\ntenants: []\n", "version"),
        ("tenants: 5\n", ":"),
    ],
)
def test_malformed_tenants_file(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(content)
    result = zonewatch("zones", "--tenants", str(path))
    assert_one_line_error(result, str(path), needle)


def test_missing_tenants_file(tmp_path: Path) -> None:
    assert_one_line_error(zonewatch("zones", "--tenants", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_zones_json_is_a_list() -> None:
    result = zonewatch("zones", "--json")
    assert result.returncode == 0, result.stderr
    assert isinstance(orjson.loads(result.stdout), list)


def test_help_runs_without_bcc_or_root() -> None:
    result = zonewatch("--help")
    assert result.returncode == 0
    assert "zones" in result.stdout


# -- every operator mistake of docs/configuration.md "Bad input": one line, exit 2 -------------

TOKENS = "version: 1\ntokens:\n  - name: all\n    token: admin-token-0001\n    tenants: ['*']\n"


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """tokens.yaml (good), latin1.yaml (not UTF-8), a regular file and a folder."""
    (tmp_path / "tokens.yaml").write_text(TOKENS)
    (tmp_path / "latin1.yaml").write_bytes(TOKENS.replace("all", "caf\xe9").encode("latin-1"))
    (tmp_path / "plain").write_text("x")
    (tmp_path / "dir").mkdir()
    return tmp_path


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted for one test (read-only, or with no inode left)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=64k,{options}", "zw-cli-test", where],
                   check=True)  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--tokens", "{d}/dir"], ["--tokens", "is a directory"]),
        (["--tokens", "{d}/latin1.yaml"], ["--tokens", "latin1.yaml", "not UTF-8"]),
        (["--tokens", "{d}/nope.yaml"], ["--tokens", "No such file"]),
        (["--tls-cert", "{d}/dir"], ["--tls-cert", "is a directory"]),
        (["--jsonl", "{d}/dir"], ["--jsonl", "is a directory"]),
        (["--ocsf", "{d}/dir"], ["--ocsf", "is a directory"]),
        (["--jsonl", "{d}/missing/out.jsonl"], ["--jsonl", "no directory"]),
        (["--ocsf", "{d}/plain/out.jsonl"], ["--ocsf", "Not a directory"]),
        (["--journal", "{d}/plain"], ["--journal", "plain is not a directory"]),
        (["--journal", "{d}/plain/j"], ["--journal", "plain is not a directory"]),
        (["--metrics", "127.0.0.1:99999"], ["--metrics", "out of range 1-65535"]),
        (["--metrics", "127.0.0.1:0"], ["--metrics", "out of range 1-65535"]),
        (["--metrics", "garbage"], ["--metrics", "expected HOST:PORT"]),
        (["--metrics", "::1:9464"], ["--metrics", "[::1]:PORT"]),
        (["--metrics", "[::zz]:9464"], ["--metrics", "not an IPv6 address"]),
        (["--metrics", "bad host:9464"], ["--metrics", "not a host name"]),
        (["--metrics", "127.0.0.1:http"], ["--metrics", "port must be a number"]),
        (["--tls-cert", "{d}/tokens.yaml"], ["--tls-cert", "not a PEM file"]),
        (["--otlp", "garbage"], ["--otlp", "http(s)://HOST[:PORT] or HOST:PORT"]),
        (["--otlp", "ftp://collector:4317"], ["--otlp", "http(s)://HOST[:PORT]"]),
        (["--otlp", "http://collector:99999"], ["--otlp", "bad port"]),
        (["--grpc", "localhost:99999"], ["--grpc", "out of range 0-65535"]),
        (["--grpc", "unix:relative.sock"], ["--grpc", "unix:/ABSOLUTE/PATH"]),
        (["--flow-idle", "1e400"], ["--flow-idle", "finite"]),
        (["--flow-idle", "-1"], ["--flow-idle", "must be > 0"]),
        (["--stats-interval", "inf"], ["--stats-interval", "finite"]),
        (["--stats-interval", "nan"], ["--stats-interval", "finite"]),
        (["--stats-interval", "0"], ["--stats-interval", "must be > 0"]),
        (["--duration", "1e12"], ["--duration", "at most"]),
    ],
)
def test_run_option_mistakes(files: Path, args: list[str], needles: list[str]) -> None:
    result = zonewatch("run", *(a.format(d=files) for a in args))
    assert_one_line_error(result, "zonewatch run", *needles)
    assert "probe" not in result.stderr  # refused while parsing: nothing attached


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--count", "0"], ["--count", ">= 1"]),
        (["--since-seq", "-1"], ["--since-seq", ">= 0"]),
        (["--since-seq", "1e3"], ["--since-seq", "whole number"]),
        (["--token", "@{d}/dir"], ["--token", "is a directory"]),
        (["--token", "@{d}/latin1.yaml"], ["--token", "not UTF-8"]),
        (["--server", "localhost:70000"], ["--server", "out of range"]),
        (["--tls-ca", "{d}/tokens.yaml"], ["--tls-ca", "not a PEM file"]),
    ],
)
def test_tail_option_mistakes(files: Path, args: list[str], needles: list[str]) -> None:
    assert_one_line_error(zonewatch("tail", *(a.format(d=files) for a in args)), *needles)


def test_replay_speed_is_a_finite_positive_factor() -> None:
    for bad, needle in (("inf", "finite"), ("0", "> 0"), ("1e9", "at most 1000000")):
        assert_one_line_error(zonewatch("replay", "-", "--speed", bad), "--speed", needle)


def test_record_and_replay_outputs_are_checked(files: Path) -> None:
    assert_one_line_error(zonewatch("record", "--out", str(files / "dir")), "--out", "directory")
    result = zonewatch("replay", "-", "--jsonl", str(files / "dir"))
    assert_one_line_error(result, "--jsonl", "directory")


def test_outputs_on_a_read_only_file_system(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro") as ro:
        for option in ("--jsonl", "--ocsf"):
            result = zonewatch("run", option, str(ro / "out.jsonl"))
            assert_one_line_error(result, option, "read-only file system")
        result = zonewatch("run", "--journal", str(ro / "journal"))
        assert_one_line_error(result, "--journal", "read-only file system")


def test_journal_with_no_free_inode(tmp_path: Path, files: Path) -> None:
    with tmpfs(tmp_path / "full", "nr_inodes=2") as full:
        (full / "taken").write_text("")  # the last inode (the root has the other)
        result = zonewatch("run", "--journal", str(full / "journal"))
        assert_one_line_error(result, "--journal", "no free inodes")


def test_journal_that_fails_when_opened_is_one_line_before_any_probe(
    tmp_path: Path, files: Path
) -> None:
    """The lock file is there (the parse-time check passes) but no segment can be made."""
    with tmpfs(tmp_path / "full", "nr_inodes=3") as full:
        (full / "journal").mkdir()
        (full / "journal" / "lock").write_text("")
        result = zonewatch("run", "--journal", str(full / "journal"),
                           "--tokens", str(files / "tokens.yaml"),
                           "--grpc", f"unix:{tmp_path}/zw.sock")  # fmt: skip
        assert_one_line_error(result, "journal", "cannot keep the alert journal here")
        assert "probe" not in result.stderr


def test_metrics_port_in_use_is_one_line_before_any_probe(files: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = zonewatch("run", "--metrics", f"127.0.0.1:{port}", "--journal", str(files / "j"))
    assert_one_line_error(result, f"--metrics 127.0.0.1:{port}", "cannot listen")
    assert "probe" not in result.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--metrics", "[::1]:9464"),
        ("--metrics", "localhost:9464"),
        ("--metrics", "0.0.0.0:9464"),
        ("--grpc", "[::1]:50051"),
        ("--grpc", "127.0.0.1:0"),
        ("--grpc", "unix:/run/zonewatch/zonewatch.sock"),
        ("--grpc", "unix:///run/zonewatch/zonewatch.sock"),
        ("--flow-idle", "0.5"),
        ("--otlp", "http://127.0.0.1:4317"),
        ("--otlp", "https://otel.example.com/v1/logs"),
        ("--otlp", "localhost:4317"),
        ("--jsonl", "-"),
    ],
)
def test_good_values_parse(option: str, value: str) -> None:
    from zonewatch.cli import build_parser

    args = build_parser().parse_args(["run", option, value])  # SystemExit(2) if refused
    assert str(getattr(args, option[2:].replace("-", "_"))) == value


def test_sigterm_stops_the_agent_but_a_child_forked_from_it_just_exits() -> None:
    """pyroute2 forks a child to enter a pod's network namespace and SIGTERMs it when done:
    the child must die (not log "stopping on SIGTERM" and live on), the agent keep going."""
    from zonewatch.cli import stop_on_signal

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, stop_on_signal(stop))
    try:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: exits 0 only if SIGTERM did not end it within 5 s
            os.write(ready_w, b"x")  # (a signal before Python's after-fork reset is dropped)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(0)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        os.close(ready_r)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    finally:
        signal.signal(signal.SIGTERM, previous)
