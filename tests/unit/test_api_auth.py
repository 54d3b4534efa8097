"""Tokens file, authentication, tenant scope, and one test per stream filter field."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.alerts import make_alert
from zonewatch.api.auth import Principal, TokenStore
from zonewatch.api.filters import AlertMatcher, AllowDeny, scoped
from zonewatch.errors import ConfigError
from zonewatch.model import Severity

TOKENS = f"""version: 1
tokens:
  - name: acme
    token: acme-token-0001
    tenants: [acme]
  - name: hashed
    sha256: "{hashlib.sha256(b"hashed-token-0001").hexdigest()}"
    tenants: [globex, initech]
  - name: all
    token: admin-token-0001
    tenants: ["*"]
"""


def store(tmp_path: Path, text: str = TOKENS) -> TokenStore:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return TokenStore.load(path)


def test_tokens_authenticate_to_their_scope(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.authenticate("acme-token-0001") == Principal("acme", frozenset({"acme"}))
    assert s.authenticate("hashed-token-0001") == Principal(
        "hashed", frozenset({"globex", "initech"})
    )
    assert s.authenticate("admin-token-0001") == Principal("all", None)
    assert s.authenticate("acme-token-0002") is None
    assert s.authenticate("") is None


def test_metadata_needs_a_bearer_token(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.from_metadata([("authorization", "Bearer acme-token-0001")]) is not None
    assert s.from_metadata([("authorization", "bearer acme-token-0001")]) is not None
    assert s.from_metadata([("authorization", "Basic acme-token-0001")]) is None
    assert s.from_metadata([("x-token", "acme-token-0001")]) is None
    assert s.from_metadata(None) is None


ENTRY = "version: 1\ntokens:\n  - name: a\n    token: long-enough-1\n"


@pytest.mark.parametrize(
    ("text", "line", "col", "message"),
    [
        ("", 1, 1, "empty tokens file"),
        ("tokens: []", 1, 1, "missing 'version'"),
        ("version: 2\ntokens: []", 1, 10, "unsupported version '2'"),
        ("version: 1\ntokens: []", 2, 9, "non-empty list"),
        ("version: 1\ntokens: {a: 1}", 2, 9, "must be a list of token entries"),
        ("version: 1\ntoken: []", 2, 1, "unknown key 'token' (expected version, tokens)"),
        ("version: 1\ntokens:\n  - name: a\n    token: short\n    tenants: [x]", 4, 12,
         "8 characters"),
        ("version: 1\ntokens:\n  - name: a\n    token: has space\n    tenants: [x]", 4, 12,
         "may hold only"),
        ("version: 1\ntokens:\n  - name: a\n    sha256: zz\n    tenants: [x]", 4, 13,
         "64 hex digits"),
        (ENTRY.replace("token: long-enough-1", "token: 123456789"), 4, 12, "must be a string"),
        (ENTRY, 3, 5, "missing 'tenants'"),
        (ENTRY + "    tenats: [x]\n", 5, 5,
         "unknown key 'tenats' (expected name, token, sha256, tenants)"),
        (ENTRY + "    tenants: x\n", 5, 14, "must be a non-empty list"),
        (ENTRY + "    tenants: []\n", 5, 14, "must be a non-empty list"),
        (ENTRY + "    tenants: [null, yes, 12]\n", 5, 15, "must be a string, not 'null'"),
        (ENTRY + "    tenants: [acme, yes]\n", 5, 21, "must be a string, not 'yes'"),
        (ENTRY + "    tenants: [acme, 12]\n", 5, 21, "must be a string, not '12'"),
        (ENTRY + "    tenants: [\"acme\", \"*\"]\n", 5, 23, "list it alone"),
        (ENTRY + "    tenants: [acme, acme]\n", 5, 21, "listed twice"),
        (ENTRY + "    tenants: [\"a b\"]\n", 5, 15, "invalid tenant name"),
        (ENTRY + "    sha256: \"" + "0" * 64 + "\"\n    tenants: [x]\n", 3, 5, "exactly one"),
        ("version: 1\ntokens:\n  - name: a\n    tenants: [x]\n", 3, 5, "exactly one"),
        ("version: 1\ntokens:\n  - {name: a, token: long-enough-1, tenants: [x]}\n"
         "  - {name: a, token: long-enough-2, tenants: [y]}", 4, 12,
         "duplicate token name 'a' (first at line 3)"),
        ("version: 1\ntokens:\n  - {name: a, token: long-enough-1, tenants: [x]}\n"
         "  - {name: a, token: long-enough-1, name: b, tenants: [y]}", 4, 37, "duplicate key"),
        ("version: 1\ntokens:\n  - [a]\n", 3, 5, "a token entry is a mapping"),
        ("version: 1\ntokens: [\n", 3, 1, "not YAML"),
        ("version: 1\ntokens: &a [1]\nother: *a\n", 3, 8, "aliases"),
    ],
)  # fmt: skip
def test_malformed_tokens_files_are_refused_with_file_line_col(
    tmp_path: Path, text: str, line: int, col: int, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        store(tmp_path, text)
    assert err.value.where == f"{tmp_path / 'tokens.yaml'}:{line}:{col}"
    assert message in err.value.message


SECRET = "s3cret-acme-0001"


@pytest.mark.parametrize(
    "second",
    [
        f'token: "{SECRET}"',
        f'sha256: "{hashlib.sha256(SECRET.encode()).hexdigest()}"',
        f'sha256: "{hashlib.sha256(SECRET.encode()).hexdigest().upper()}"',
    ],
    ids=["token", "sha256", "SHA256"],
)
def test_two_entries_with_the_same_secret_are_refused_without_showing_it(
    tmp_path: Path, second: str
) -> None:
    """A tenant token must never silently become all-tenant (or the reverse) because a
    later entry reuses its secret."""
    text = (
        f'version: 1\ntokens:\n  - name: acme\n    token: "{SECRET}"\n    tenants: [acme]\n'
        f'  - name: all\n    {second}\n    tenants: ["*"]\n'
    )
    with pytest.raises(ConfigError) as err:
        store(tmp_path, text)
    assert err.value.where.rsplit(":", 2)[1] == "7"  # the second secret's line
    assert "token 'all' has the same secret as token 'acme' (line 4)" in err.value.message
    shown = str(err.value)
    assert SECRET not in shown
    assert hashlib.sha256(SECRET.encode()).hexdigest() not in shown.lower()


def test_a_secret_never_reaches_an_error_or_a_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for secret_line in ("token: 12345678901", "token: [s3cret-value-1]", "sha256: 12345"):
        text = f"version: 1\ntokens:\n  - name: a\n    {secret_line}\n    tenants: [x]\n"
        with pytest.raises(ConfigError) as err:
            store(tmp_path, text)
        value = secret_line.split(": ", 1)[1].strip("[]")
        assert value not in str(err.value)
    assert not any("s3cret" in r.getMessage() for r in caplog.records)


def test_the_cli_exits_2_with_one_line_for_a_bad_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(ENTRY + "    tenats: [acme]\n")
    path.chmod(0o600)
    proc = subprocess.run(
        [sys.executable, "-m", "zonewatch", "run", "--tokens", str(path), "--grpc",
         f"unix:{tmp_path}/zw.sock", "--journal", str(tmp_path / "j"), "--duration", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"{path}:5:5: token entry: unknown key 'tenats'" in line


def test_scope_narrows_and_refuses_other_tenants() -> None:
    acme = Principal("acme", frozenset({"acme"}))
    assert scoped(acme, []).allow == frozenset({"acme"})
    assert scoped(acme, ["acme"]).allow == frozenset({"acme"})
    with pytest.raises(PermissionError):
        scoped(acme, ["globex"])
    admin = Principal("all", None)
    assert scoped(admin, []).allow is None
    assert scoped(admin, ["globex"]).allow == frozenset({"globex"})


def test_filter_tenants() -> None:
    m = AlertMatcher(tenants=AllowDeny(frozenset({"acme"})))
    assert m(make_alert(0, "acme")) and not m(make_alert(0, "globex"))
    m = AlertMatcher(tenants=AllowDeny.of(deny=["acme"]))
    assert not m(make_alert(0, "acme")) and m(make_alert(0, "globex"))


def test_filter_zones_by_name_or_id() -> None:
    a = make_alert(0, "acme")
    assert AlertMatcher(zones=AllowDeny.of([a.zone.name]))(a)
    assert AlertMatcher(zones=AllowDeny.of([a.zone.id]))(a)
    assert not AlertMatcher(zones=AllowDeny.of(["other"]))(a)
    assert not AlertMatcher(zones=AllowDeny.of(deny=[a.zone.id]))(a)


def test_filter_min_severity() -> None:
    m = AlertMatcher(min_severity=Severity.HIGH)
    assert m(make_alert(0, severity=Severity.HIGH))
    assert m(make_alert(0, severity=Severity.CRITICAL))
    assert not m(make_alert(0, severity=Severity.MEDIUM))


def test_filter_rules_allow_minus_deny() -> None:
    m = AlertMatcher(rules=AllowDeny.of(["a", "b"], ["b"]))
    assert m(make_alert(0, rule="a"))
    assert not m(make_alert(0, rule="b"))
    assert not m(make_alert(0, rule="c"))


def test_filter_tags_any_allowed_none_denied() -> None:
    m = AlertMatcher(tags=AllowDeny.of(["net"], ["maturity_sandbox"]))
    assert m(make_alert(0, tags=("maturity_stable", "net")))
    assert not m(make_alert(0, tags=("maturity_sandbox", "net")))
    assert not m(make_alert(0, tags=("maturity_stable", "host")))
    assert AlertMatcher()(make_alert(0, tags=()))
