"""The tenants file: matching rules, and every malformation reported at its line:col."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from zonewatch.errors import ConfigError
from zonewatch.inventory.tenants import (
    MAX_TENANTS_FILE_BYTES,
    TenantMap,
    TenantRule,
    TenantsFile,
    load_tenants,
)
from zonewatch.model import DEFAULT_TENANT

pytestmark = pytest.mark.unit

HEAD = "version: 1\ntenants:\n"  # two lines: entries start on line 3
A = HEAD + "  - name: a\n"  # an entry named a on line 3; its next key is on line 4

EXAMPLE = """\
version: 1
tenants:
  - name: acme
    zones: ["acme-*", "web-?"]     # zone-name globs (fnmatch)
    labels: {team: payments}       # all must equal the zone's labels
  - name: globex
    labels:
      kata.sandbox: 39083257ece6
      team: research
  - name: initech
    zones: ["*"]
"""


def write(tmp_path: Path, text: str | bytes, name: str = "tenants.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str | bytes) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_tenants(path)
    return info.value


# --------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------
@pytest.fixture
def tenants(tmp_path: Path) -> TenantMap:
    return load_tenants(write(tmp_path, EXAMPLE))


def test_example_file_loads_in_order(tenants: TenantMap) -> None:
    assert [r.name for r in tenants.rules] == ["acme", "globex", "initech"]
    acme = tenants.rules[0]
    assert acme.zones == ("acme-*", "web-?")
    assert acme.labels == (("team", "payments"),)
    assert tenants.rules[1].labels == (("kata.sandbox", "39083257ece6"), ("team", "research"))
    assert acme.where.endswith(":3:5")
    assert len(tenants) == 3


@pytest.mark.parametrize(
    ("name", "labels", "tenant"),
    [
        ("acme-prod", {}, "acme"),
        ("web-1", {}, "acme"),
        ("web-12", {}, "initech"),  # ? is one character
        ("ACME-prod", {}, "initech"),  # globs are case-sensitive
        ("db", {"team": "payments"}, "acme"),  # labels alone match
        ("db", {"team": "payments", "extra": "x"}, "acme"),  # extra zone labels are fine
        ("db", {"team": "research"}, "initech"),  # globex needs both of its labels
        ("db", {"team": "research", "kata.sandbox": "39083257ece6"}, "globex"),
        ("acme-1", {"team": "research", "kata.sandbox": "39083257ece6"}, "acme"),  # first wins
        ("", {}, "initech"),
    ],
)
def test_first_matching_rule_wins(
    tenants: TenantMap, name: str, labels: dict[str, str], tenant: str
) -> None:
    assert tenants.tenant_for(name, labels) == tenant


def test_no_match_is_the_default_tenant(tmp_path: Path) -> None:
    tenants = load_tenants(write(tmp_path, "version: 1\ntenants:\n  - name: a\n    zones: [a-*]\n"))
    assert tenants.tenant_for("b-1", {"team": "a"}) == DEFAULT_TENANT
    assert tenants.rule_for("b-1", {}) is None
    assert tenants.tenant_for("a-1", {}) == "a"


def test_empty_map_and_empty_list() -> None:
    assert TenantMap.empty().tenant_for("anything", {"k": "v"}) == DEFAULT_TENANT
    assert len(TenantMap.empty()) == 0


def test_empty_tenant_list_is_valid(tmp_path: Path) -> None:
    tenants = load_tenants(write(tmp_path, "version: 1\ntenants: []\n"))
    assert tenants == TenantMap.empty()
    assert tenants.tenant_for("x", {}) == DEFAULT_TENANT


@pytest.mark.parametrize(
    ("glob", "name", "matches"),
    [
        ("web-[0-9]", "web-7", True),
        ("web-[0-9]", "web-x", False),
        ("web-[!0-9]", "web-x", True),
        ("[", "[", True),  # an unclosed bracket is literal, not an error
        ("a*", "a\nb", True),
        ("*.prod", "api.prod", True),
        ("*.prod", "api-prod", False),
        ("acme", "acme-1", False),  # a glob matches the whole name
    ],
)
def test_glob_semantics(glob: str, name: str, matches: bool) -> None:
    rule = TenantRule(name="t", zones=(glob,))
    assert rule.matches(name, {}) is matches


def test_labels_with_an_empty_value_must_equal() -> None:
    rule = TenantRule(name="t", labels=(("tier", ""),))
    assert rule.matches("z", {"tier": ""})
    assert not rule.matches("z", {})
    assert not rule.matches("z", {"tier": "gold"})


def test_a_rule_without_labels_never_matches_by_labels() -> None:
    rule = TenantRule(name="t", zones=("x-*",))
    assert not rule.matches("y", {"any": "thing"})


def test_programmatic_construction_is_checked() -> None:
    with pytest.raises(ValueError, match="invalid tenant name"):
        TenantRule(name="bad name")
    with pytest.raises(ValueError, match="duplicate"):
        TenantMap([TenantRule(name="a", zones=("*",)), TenantRule(name="a", zones=("b",))])
    rule = TenantRule(name="a", zones=("*",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.name = "b"  # type: ignore[misc]


def test_equal_files_give_equal_maps(tmp_path: Path) -> None:
    a = load_tenants(write(tmp_path, EXAMPLE, "a.yaml"))
    b = load_tenants(write(tmp_path, "\n\n" + EXAMPLE, "b.yaml"))  # other lines: same rules
    assert a == b
    assert hash(a) == hash(b)


def test_crlf_bom_and_flow_style(tmp_path: Path) -> None:
    text = "\ufeffversion: 1\r\ntenants: [{name: a, zones: ['a-*']}, {name: b, labels: {x: y}}]\r\n"
    tenants = load_tenants(write(tmp_path, text.encode("utf-8")))
    assert tenants.tenant_for("a-1", {}) == "a"
    assert tenants.tenant_for("q", {"x": "y"}) == "b"


def test_path_may_be_a_string(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    assert load_tenants(str(path)) == load_tenants(path)


@pytest.mark.parametrize("name", ["a", "A-b_c.d", "0", "x" * 63, "default", "team.payments-eu_1"])
def test_valid_tenant_names(tmp_path: Path, name: str) -> None:
    tenants = load_tenants(
        write(tmp_path, f"version: 1\ntenants:\n  - name: '{name}'\n    zones: [z]\n")
    )
    assert tenants.tenant_for("z", {}) == name


# --------------------------------------------------------------------------------------
# Errors, each at the offending node
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "line", "col", "needle"),
    [
        # not YAML
        ("version: 1\ntenants:\n  - name: acme\n    zones: [unclosed\n", 5, 1, "not YAML"),
        ("version: 1\ntenants: {a: b\n", 3, 1, "not YAML"),
        ("version: 1\n\ttenants: []\n", 2, 1, "not YAML"),
        ("version: 1\n---\nversion: 1\n", 2, 1, "single document"),
        # top level
        ("", 1, 1, "empty"),
        ("# only a comment\n", 1, 1, "empty"),
        ("- version: 1\n", 1, 1, "mapping"),
        ("just a string\n", 1, 1, "mapping"),
        ("tenants: []\n", 1, 1, "missing 'version'"),
        ("version: 1\n", 1, 1, "missing 'tenants'"),
        ("version: 2\ntenants: []\n", 1, 10, "unsupported version '2'"),
        ("version: '1'\ntenants: []\n", 1, 10, "unsupported version"),
        ("version: 1.0\ntenants: []\n", 1, 10, "unsupported version"),
        ("version: true\ntenants: []\n", 1, 10, "unsupported version"),
        ("version: [1]\ntenants: []\n", 1, 10, "unsupported version"),
        ("version:\ntenants: []\n", 1, 9, "unsupported version"),
        ("version: 1\ntenants: []\nextra: 3\n", 3, 1, "unknown key 'extra'"),
        ("version: 1\nversion: 1\ntenants: []\n", 2, 1, "duplicate key 'version'"),
        ("version: 1\n1: x\ntenants: []\n", 2, 1, "keys must be strings"),
        ("tenants: 5\nversion: 1\n", 1, 10, "must be a list"),
        ("version: 1\ntenants:\n", 2, 9, "must be a list"),
        ("version: 1\ntenants: {name: a}\n", 2, 10, "must be a list"),
        # entries
        ("version: 1\ntenants:\n  - acme\n", 3, 5, "tenant entry is a mapping"),
        ("version: 1\ntenants:\n  - zones: ['a-*']\n", 3, 5, "missing 'name'"),
        ("version: 1\ntenants:\n  - name: a\n    zone: [a]\n", 4, 5, "unknown key 'zone'"),
        ("version: 1\ntenants:\n  - name: a\n", 3, 5, "never matches"),
        (A + "    zones: []\n    labels: {}\n", 3, 5, "never matches"),
        ("version: 1\ntenants:\n  - name: 5\n    zones: [a]\n", 3, 11, "must be a string"),
        ("version: 1\ntenants:\n  - name: ''\n    zones: [a]\n", 3, 11, "must not be empty"),
        ("version: 1\ntenants:\n  - name: [a]\n    zones: [a]\n", 3, 11, "must be a string"),
        ("version: 1\ntenants:\n  - name: null\n    zones: [a]\n", 3, 11, "must be a string"),
        (HEAD + "  - name: bad name\n    zones: [a]\n", 3, 11, "invalid tenant name"),
        ("version: 1\ntenants:\n  - name: ../etc\n    zones: [a]\n", 3, 11, "invalid tenant name"),
        ("version: 1\ntenants:\n  - name: '..'\n    zones: [a]\n", 3, 11, "invalid tenant name"),
        ("version: 1\ntenants:\n  - name: " + "x" * 64 + "\n    zones: [a]\n", 3, 11,
         "invalid tenant name"),
        (HEAD + "  - name: caf\u00e9\n    zones: [a]\n", 3, 11, "invalid tenant name"),
        ("version: 1\ntenants:\n  - name: a\n    zones: [a]\n  - name: b\n    zones: [b]\n"
         "  - name: a\n    zones: [c]\n", 7, 11, "duplicate tenant name 'a' (first at line 3)"),
        ("version: 1\ntenants:\n  - name: a\n    name: b\n    zones: [a]\n", 4, 5, "duplicate key"),
        # zones
        ("version: 1\ntenants:\n  - name: a\n    zones: 'a-*'\n", 4, 12, "must be a list"),
        ("version: 1\ntenants:\n  - name: a\n    zones: [a, 7]\n", 4, 16, "must be a string"),
        ("version: 1\ntenants:\n  - name: a\n    zones: [a, '']\n", 4, 16, "must not be empty"),
        ("version: 1\ntenants:\n  - name: a\n    zones: [[a]]\n", 4, 13, "must be a string"),
        (A + "    zones:\n      - {x: y}\n", 5, 9, "must be a string"),
        ("version: 1\ntenants:\n  - name: a\n    zones: [" + "x" * 2000 + "]\n", 4, 13, "longer"),
        # labels
        ("version: 1\ntenants:\n  - name: a\n    labels: [team]\n", 4, 13, "must be a mapping"),
        ("version: 1\ntenants:\n  - name: a\n    labels: {tier: 1}\n", 4, 20, "must be a string"),
        ("version: 1\ntenants:\n  - name: a\n    labels: {on: x}\n", 4, 14, "keys must be strings"),
        ("version: 1\ntenants:\n  - name: a\n    labels: {k: [v]}\n", 4, 17, "must be a string"),
        ("version: 1\ntenants:\n  - name: a\n    labels: {k: null}\n", 4, 17, "must be a string"),
        ("version: 1\ntenants:\n  - name: a\n    labels: {'': v}\n", 4, 14, "label name"),
        (A + "    labels: {k: a, k: b}\n", 4, 20, "duplicate key 'k'"),
        # YAML features we refuse
        ("version: 1\ntenants:\n  - name: a\n    zones: &z [a-*]\n  - name: b\n    zones: *z\n",
         6, 12, "aliases"),
        ("version: 1\nbase: &b {zones: [x]}\ntenants:\n  - <<: *b\n    name: a\n", 4, 9,
         "aliases"),
        ("version: 1\ntenants:\n  - {<<: {zones: [x]}, name: a}\n", 3, 6, "keys must be strings"),
        ("version: 1\ntenants:\n  - !custom {name: a, zones: [a]}\n", 3, 5, "tenant entry"),
        ("version: 1\ntenants:\n  - name: a\n    labels: !!omap [{k: v}]\n", 4, 13,
         "must be a mapping"),
        ("version: 1\ntenants:\n  - name: !!python/name:os.system a\n    zones: [a]\n", 3, 11,
         "must be a string"),
        ("version: 1\ntenants:\n  - name: a\n    zones: !custom [a]\n", 4, 12, "must be a list"),
    ],
)  # fmt: skip
def test_malformed_file_errors_point_at_the_node(
    tmp_path: Path, text: str, line: int, col: int, needle: str
) -> None:
    err = load_error(tmp_path, text)
    path = tmp_path / "tenants.yaml"
    assert err.where == f"{path}:{line}:{col}", err.message
    assert needle in err.message
    assert str(err) == f"{path}:{line}:{col}: {err.message}"
    assert "\n" not in str(err)


def test_an_alias_is_refused_where_it_is_used(tmp_path: Path) -> None:
    text = "version: 1\ntenants:\n  - &entry\n    name: a\n    zones: [a]\n  - *entry\n"
    err = load_error(tmp_path, text)
    assert err.where.endswith(":6:5")
    assert "aliases" in err.message


def test_a_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    lines += ["tenants: [{name: t, zones: *a29}]"]
    err = load_error(tmp_path, "\n".join(lines) + "\n")
    assert err.where.endswith(":3:10")  # the first alias, in a1
    assert "aliases" in err.message


def test_deep_nesting_is_an_error_not_a_crash(tmp_path: Path) -> None:
    err = load_error(tmp_path, "version: 1\ntenants: " + "[" * 20_000 + "]" * 20_000 + "\n")
    assert err.where.startswith(str(tmp_path / "tenants.yaml") + ":")
    assert "YAML" in err.message or "list" in err.message


def test_invalid_utf8_is_located(tmp_path: Path) -> None:
    err = load_error(tmp_path, b"version: 1\ntenants:\n  - name: ab\xffc\n    zones: [a]\n")
    assert err.where.endswith(":3:13")
    assert "UTF-8" in err.message


@pytest.mark.parametrize(
    ("text", "line", "col"),
    [
        ("version: 1\ntenants:\n  - name: a\x1b[31m\n    zones: [a]\n", 3, 12),
        ("version: 1\x00\ntenants: []\n", 1, 11),
        ("version: 1\ntenants: []\n\x07", 3, 1),
    ],
)
def test_control_characters_are_located(tmp_path: Path, text: str, line: int, col: int) -> None:
    err = load_error(tmp_path, text)
    assert err.where.endswith(f":{line}:{col}")
    assert "not YAML" in err.message
    assert "\x1b" not in str(err) and "\x00" not in str(err)


def test_escape_sequences_in_values_are_not_echoed_raw(tmp_path: Path) -> None:
    # A double-quoted YAML string may carry an escape; the error shows it escaped.
    err = load_error(tmp_path, 'version: 1\ntenants:\n  - name: "evil\\e[2J"\n    zones: [a]\n')
    assert "invalid tenant name" in err.message
    assert "\x1b" not in str(err)
    assert "\\x1b" in err.message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_tenants(path)
    assert info.value.where == f"{path}:1:1"
    assert "cannot read" in info.value.message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_tenants(tmp_path)
    assert info.value.where == f"{tmp_path}:1:1"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_tenants(path)
    assert "cannot read" in info.value.message


def test_nul_in_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_tenants(f"{tmp_path}/a\x00b")
    assert info.value.where.endswith(":1:1")


def test_oversized_file(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\ntenants: []\n" + "#" * MAX_TENANTS_FILE_BYTES)
    with pytest.raises(ConfigError) as info:
        load_tenants(path)
    assert info.value.where == f"{path}:1:1"
    assert "larger" in info.value.message


def test_config_error_is_a_zonewatch_error_with_exit_code_2(tmp_path: Path) -> None:
    err = load_error(tmp_path, "version: 3\ntenants: []\n")
    assert err.exit_code == 2


@pytest.mark.timeout(60)
def test_many_tenants(tmp_path: Path) -> None:
    body = "".join(f"  - name: t{i}\n    zones: ['z{i}-*']\n" for i in range(5000))
    tenants = load_tenants(write(tmp_path, "version: 1\ntenants:\n" + body))
    assert len(tenants) == 5000
    assert tenants.tenant_for("z4999-a", {}) == "t4999"


# --------------------------------------------------------------------------------------
# The Kubernetes namespace as the tenant of last resort
# --------------------------------------------------------------------------------------
def test_namespace_label_is_the_tenant_when_no_entry_matches(tenants: TenantMap) -> None:
    pod = {"kata.sandbox": "39083257ece6abc", "k8s.namespace": "shop"}
    assert tenants.tenant_for("39083257ece6abc", pod) == "initech"  # the "*" entry first
    no_catch_all = TenantMap(r for r in tenants if r.name != "initech")
    assert no_catch_all.tenant_for("39083257ece6abc", pod) == "shop"
    assert no_catch_all.tenant_for("39083257ece6abc", {"k8s.namespace": "globex"}) == "globex"
    assert no_catch_all.tenant_for("x", {}) == DEFAULT_TENANT
    assert TenantMap.empty().tenant_for("x", pod) == "shop"


@pytest.mark.parametrize("namespace", ["", ".", "..", "a/b", "x" * 64, "sh\\x1bop", "ünï"])
def test_a_namespace_that_is_no_tenant_name_is_not_used(namespace: str) -> None:
    assert TenantMap.empty().tenant_for("z", {"k8s.namespace": namespace}) == DEFAULT_TENANT


def test_label_entries_match_k8s_labels(tmp_path: Path) -> None:
    entry = "  - name: shop-team\n    labels: {k8s.namespace: shop, k8s.pod.name: web-0}\n"
    tenants = load_tenants(write(tmp_path, HEAD + entry))
    assert tenants.tenant_for("z", {"k8s.namespace": "shop", "k8s.pod.name": "web-0"}) == (
        "shop-team"
    )
    assert tenants.tenant_for("z", {"k8s.namespace": "shop", "k8s.pod.name": "web-1"}) == "shop"


# --------------------------------------------------------------------------------------
# Following the file: TenantsFile
# --------------------------------------------------------------------------------------
def test_tenants_file_reloads_on_change_and_keeps_the_old_map_on_a_bad_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, A + "    zones: [a-*]\n")
    followed = TenantsFile(path, check_interval=0)
    assert followed.tenants.tenant_for("a-1", {}) == "a"
    assert followed.maybe_reload() is None  # unchanged: not even read

    # Each version differs in size: two writes within one clock tick share an mtime.
    write(tmp_path, A + "    zones: [bb-*]\n")
    new = followed.maybe_reload()
    assert new is not None and new.tenant_for("bb-1", {}) == "a"
    assert followed.tenants is new and followed.reloads == 1

    with caplog.at_level(logging.ERROR, logger="zonewatch.inventory.tenants"):
        write(tmp_path, A + "    zones: [bb-*]\n    zonez: [c]\n")
        assert followed.maybe_reload() is None
        assert followed.maybe_reload() is None  # the same bad file: not logged again
    assert followed.tenants is new
    assert followed.last_error is not None and followed.last_error.startswith(f"{path}:5:5: ")
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and f"{path}:5:5" in errors[0] and "\n" not in errors[0]

    os.unlink(path)  # replaced by a new file (another inode), as editors and ConfigMaps do
    write(tmp_path, A + "    zones: [c-*]\n")
    fixed = followed.maybe_reload()
    assert fixed is not None and fixed.tenant_for("c-1", {}) == "a"
    assert followed.last_error is None


def test_tenants_file_reload_on_request_and_at_most_each_interval(tmp_path: Path) -> None:
    path = write(tmp_path, A + "    zones: [a-*]\n")
    followed = TenantsFile(path, check_interval=3600)
    write(tmp_path, A + "    zones: [bb-*]\n")
    assert followed.maybe_reload() is None  # not looked at before the interval
    followed.request_reload()  # SIGHUP
    new = followed.maybe_reload()
    assert new is not None and new.tenant_for("bb-1", {}) == "a"
    followed.request_reload()
    assert followed.maybe_reload() is None  # read again, but nothing changed


def test_a_vanished_tenants_file_keeps_the_running_map(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    followed = TenantsFile(path, check_interval=0)
    os.unlink(path)
    assert followed.maybe_reload() is None
    assert followed.last_error is not None and "cannot read" in followed.last_error
    assert len(followed.tenants) == 3


def test_a_bad_tenants_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TenantsFile(write(tmp_path, "version: 2\n"))
