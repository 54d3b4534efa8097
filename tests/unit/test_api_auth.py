"""Tokens file, authentication, tenant scope, and one test per stream filter field."""

from __future__ import annotations

import hashlib
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tokens: []", "version: 1"),
        ("version: 1\ntokens: []", "non-empty"),
        ("version: 1\ntokens:\n  - name: a\n    token: short\n    tenants: [x]", "8 characters"),
        ("version: 1\ntokens:\n  - name: a\n    sha256: zz\n    tenants: [x]", "hex"),
        ("version: 1\ntokens:\n  - name: a\n    token: long-enough-1\n", "tenants"),
        (
            "version: 1\ntokens:\n  - {name: a, token: long-enough-1, tenants: [x]}\n"
            "  - {name: a, token: long-enough-2, tenants: [y]}",
            "duplicate",
        ),
    ],
)
def test_malformed_tokens_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        store(tmp_path, text)


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
