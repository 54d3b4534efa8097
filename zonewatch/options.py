"""Types of command-line values, checked when the command line is parsed: before any file is
written, any port bound or any probe attached. Each raises argparse.ArgumentTypeError with
what is wrong, which OneLineParser prints as one line naming the option (exit code 2).

docs/configuration.md ("Bad input") lists every mistake tried and the line it gives.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import stat
from pathlib import Path
from urllib.parse import urlsplit

MAX_SECONDS = 366 * 86400.0  # a year: past it an interval is a typo (and overflows timers)
MAX_COUNT = 1 << 62
MAX_FACTOR = 1e6
MAX_TEXT_FILE_BYTES = 1 << 20  # tokens, tenants, TLS files are a few KiB
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")  # fmt: skip


def _bad(value: str, what: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{value!r}: {what}")


def _positive(value: str, what: str, most: float, most_says: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _bad(value, "not a number") from None
    if not math.isfinite(number):
        raise _bad(value, f"must be a finite {what}")
    if not number > 0:
        raise _bad(value, "must be > 0")
    if number > most:
        raise _bad(value, f"must be at most {most_says}")
    return number


def seconds(value: str) -> float:
    """A finite, positive number of seconds, at most a year (not nan, inf, 1e400, -3)."""
    return _positive(value, "number of seconds", MAX_SECONDS, f"{MAX_SECONDS:.0f} (a year)")


def factor(value: str) -> float:
    """A finite, positive speed-up (replay --speed), at most a million."""
    return _positive(value, "number", MAX_FACTOR, f"{MAX_FACTOR:.0f}")


def _integer(value: str, low: int, what: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise _bad(value, "not a whole number") from None
    if number < low:
        raise _bad(value, what)
    if number > MAX_COUNT:
        raise _bad(value, f"must be at most {MAX_COUNT}")
    return number


def count(value: str) -> int:
    """A whole number >= 1 (how many alerts, zones...)."""
    return _integer(value, 1, "must be >= 1")


def sequence_number(value: str) -> int:
    """A journal sequence number: a whole number >= 0."""
    return _integer(value, 0, "must be >= 0")


def _port(value: str, text: str, low: int) -> int:
    if not text.isdigit() or not text.isascii():
        raise _bad(value, f"the port must be a number {low}-65535")
    port = int(text)
    if not low <= port <= 65535:
        raise _bad(value, f"port {port} is out of range {low}-65535")
    return port


def _host(value: str, host: str) -> str:
    """HOST of HOST:PORT: a name, an IPv4 address or a bracketed IPv6 address."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _bad(value, f"{host} is not an IPv6 address") from None
        return host
    if ":" in host:
        raise _bad(value, "an IPv6 address goes in brackets: [::1]:PORT")
    if host and not _HOSTNAME.match(host):
        raise _bad(value, f"{host!r} is not a host name or address")
    return host


def _host_port(value: str, low_port: int) -> str:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise _bad(value, "expected HOST:PORT (e.g. 127.0.0.1:9464 or [::1]:9464)")
    _host(value, host)
    _port(value, port, low_port)
    return value


def listen_address(value: str) -> str:
    """HOST:PORT to listen on (`--metrics`); IPv6 as [::1]:PORT; port 1-65535."""
    return _host_port(value, 1)


def grpc_address(value: str) -> str:
    """`unix:/PATH`, `unix:///PATH` or HOST:PORT (port 0: a free one, named in the log)."""
    if value.startswith("unix:"):
        path = value.removeprefix("unix://") if value.startswith("unix://") else value[5:]
        if not path.startswith("/"):
            raise _bad(value, "expected unix:/ABSOLUTE/PATH")
        parent = Path(path).parent
        if parent.exists() and not parent.is_dir():
            raise _bad(value, f"{parent} is not a directory")
        return value
    return _host_port(value, 0)


def _writable_dir(value: str, directory: Path) -> None:
    """`directory` (existing) takes new files: write access and not a read-only mount."""
    if os.statvfs(directory).f_flag & os.ST_RDONLY:
        raise _bad(value, f"{directory} is on a read-only file system")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _bad(value, f"{directory} is not writable")


def output_file(value: str) -> str:
    """A file to append to, or - for stdout: not a directory, its folder there and writable."""
    if value == "-":
        return value
    if not value or "\x00" in value:
        raise _bad(value, "not a file name")
    path = Path(value)
    try:
        st = path.stat()
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise _bad(value, f"no directory {parent}") from None
        _writable_dir(value, parent)
        return value
    except OSError as exc:
        raise _bad(value, exc.strerror or str(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise _bad(value, "is a directory (expected a file)")
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        raise _bad(value, "on a read-only file system")
    if not os.access(path, os.W_OK):
        raise _bad(value, "not writable")
    return value


def journal_dir(value: str) -> str:
    """The journal's directory: existing and writable, or creatable; with a free inode when
    its lock file is still to be made."""
    if not value or "\x00" in value:
        raise _bad(value, "not a directory name")
    path = Path(value)
    existing = path
    while not existing.exists():  # the nearest existing ancestor gets the new folders
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise _bad(value, f"{existing} is not a directory")
    _writable_dir(value, existing)
    if not (path / "lock").exists() and os.statvfs(existing).f_favail == 0:
        raise _bad(value, f"no free inodes on the file system of {existing}")
    return value


def text_file(value: str) -> str:
    """A small readable UTF-8 file (tokens, tenants, TLS certificates and keys)."""
    if not value or "\x00" in value:
        raise _bad(value, "not a file name")
    try:
        mode = os.stat(value).st_mode
        if stat.S_ISDIR(mode):
            raise _bad(value, "is a directory (expected a file)")
        if not stat.S_ISREG(mode):  # a FIFO would block the open
            raise _bad(value, "not a regular file")
        with open(value, "rb") as f:
            data = f.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as exc:
        raise _bad(value, exc.strerror or str(exc)) from None
    if len(data) > MAX_TEXT_FILE_BYTES:
        raise _bad(value, f"larger than {MAX_TEXT_FILE_BYTES} bytes")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _bad(value, f"not UTF-8 text (line {line})") from None
    return value


def pem_file(value: str) -> str:
    """A TLS certificate or key: a small readable text file holding a PEM block."""
    text_file(value)
    with open(value, encoding="utf-8") as f:
        if "-----BEGIN " not in f.read():
            raise _bad(value, "not a PEM file (no -----BEGIN line)")
    return value


def otlp_endpoint(value: str) -> str:
    """http(s)://HOST[:PORT][/PATH] or HOST:PORT (gRPC)."""
    if "://" not in value:
        if ":" not in value:
            raise _bad(value, "expected http(s)://HOST[:PORT] or HOST:PORT")
        return _host_port(value, 1)
    url = urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise _bad(value, "expected http(s)://HOST[:PORT] or HOST:PORT")
    try:
        url.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise _bad(value, f"bad port: {exc}") from None
    return value


__all__ = [
    "count",
    "factor",
    "grpc_address",
    "journal_dir",
    "listen_address",
    "otlp_endpoint",
    "output_file",
    "pem_file",
    "seconds",
    "sequence_number",
    "text_file",
]
