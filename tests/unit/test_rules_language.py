"""The rule language: operators, macros, lists, exceptions, overrides, and errors that
name file:line:col."""

from __future__ import annotations

from pathlib import Path

import pytest

from zonewatch.model import FileEvent, NetEvent, ZoneRef, ZoneStats
from zonewatch.rules.engine import RuleContext, RuleEngine, RulesError
from zonewatch.rules.loader import load

ZONE = ZoneRef("z1", "web-1", "acme", "qemu")
HEAD = "- required_engine_version: 1\n"


def write(tmp_path: Path, body: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + body)
    return path


def rule(condition: str, *, extra: str = "") -> str:
    return (
        f"- rule: R\n  condition: '{condition}'\n  output: 'hit %zone.name'\n"
        f"  severity: high\n  dedup: 0s\n{extra}"
    )


def fe(op: str = "write", path: str = "/etc/shadow", comm: str = "qemu", **kw: object) -> FileEvent:
    return FileEvent(1, ZONE, op, path, "/srv" + path, 10, 11, comm, **kw)  # type: ignore[arg-type]


def ne(dst: str = "10.0.0.9", port: int = 443, ts: int = 1, **kw: object) -> NetEvent:
    return NetEvent(ts, ZONE, "flow_start", "egress", "tcp", "10.0.0.2", dst, 5000, port, **kw)  # type: ignore[arg-type]


def fires(tmp_path: Path, condition: str, event: object) -> bool:
    engine = RuleEngine.load(write(tmp_path, rule(condition)))
    return bool(engine.process([event]))


@pytest.mark.parametrize(
    ("condition", "hit", "miss"),
    [
        ("file.path = /etc/shadow", fe(), fe(path="/etc/passwd")),
        ("file.path != /etc/shadow", fe(path="/x"), fe()),
        ("file.path in (/etc/shadow, /etc/gshadow)", fe(), fe(path="/etc")),
        ("file.path startswith /etc/", fe(), fe(path="/home/x")),
        ("file.path startswith (/root, /etc)", fe(), fe(path="/home/x")),
        ("file.path endswith shadow", fe(), fe(path="/etc/passwd")),
        ("file.path contains tc/sh", fe(), fe(path="/etc/passwd")),
        ("file.path icontains SHADOW", fe(), fe(path="/etc/passwd")),
        ("file.path glob \"/home/*/.ssh/authorized_keys\"",
         fe(path="/home/bob/.ssh/authorized_keys"), fe(path="/home/bob/.ssh/known_hosts")),
        ("file.ret < 0", fe(ret=-13), fe(ret=3)),
        ("file.flags >= 0x40", fe(flags=0o101), fe(flags=1)),
        ("file.writable = true", fe(op="open", flags=1), fe(op="open", flags=0)),
        ("not proc.comm = qemu", fe(comm="sh"), fe()),
        ("(op = read or op = write) and file.path exists", fe(), fe(op="read", path="")),
        ("net.dst_ip cidr 10.0.0.0/8", ne(dst="10.1.2.3"), ne(dst="192.168.1.1")),
        ("net.dst_ip cidr (192.168.0.0/16, fd00::/8)", ne(dst="fd00::1"), ne(dst="10.0.0.1")),
        ("net.dst_port in (22, 23)", ne(port=22), ne(port=443)),
    ],
)  # fmt: skip
def test_operators(tmp_path: Path, condition: str, hit: object, miss: object) -> None:
    assert fires(tmp_path, condition, hit)
    assert not fires(tmp_path, condition, miss)


def test_rules_only_meet_their_channel_and_op(tmp_path: Path) -> None:
    engine = RuleEngine.load(write(tmp_path, rule("op = write and file.path = /etc/shadow")))
    assert engine.process([fe()])
    entries = engine._index
    assert [r.name for _, r, _ in entries[("file", "write")]] == ["R"]
    engine.process([ne()])
    assert entries[("net", "flow_start")] == ()  # a net event never meets the file rule


def test_macros_lists_and_nested_lists(tmp_path: Path) -> None:
    body = (
        "- list: keys\n  items: [/root/.ssh/authorized_keys]\n"
        "- list: secrets\n  items: [/etc/shadow, keys]\n"
        "- macro: writing\n  condition: op in (write, create)\n"
        + rule("writing and file.path in (secrets)")
    )
    engine = RuleEngine.load(write(tmp_path, body))
    assert engine.process([fe(path="/root/.ssh/authorized_keys")])
    assert not engine.process([fe(op="read")])


def test_exceptions_and_overrides_across_files(tmp_path: Path) -> None:
    base = write(
        tmp_path,
        "- list: tools\n  items: [qemu]\n"
        + rule(
            "file.path startswith /etc",
            extra="  tags: [a]\n  exceptions:\n    - name: known\n"
            "      fields: [proc.comm, file.path]\n"
            "      comps: [in, =]\n      values:\n        - [[backup, rsync], /etc/shadow]\n",
        ),
        "a.yaml",
    )
    local = write(
        tmp_path,
        "- list: tools\n  items: [sh]\n  override: {items: append}\n"
        "- rule: R\n  condition: and not proc.comm in (tools)\n  tags: [b]\n"
        "  override: {condition: append, tags: append}\n"
        "- rule: R\n  exceptions:\n    - name: known\n      values: [[cron, /etc/passwd]]\n"
        "  override: {exceptions: append}\n",
        "b.yaml",
    )
    engine = RuleEngine.load([base, local])
    assert engine.rules[0].tags == ("a", "b")
    assert engine.process([fe(comm="vi")])
    assert not engine.process([fe(comm="rsync")])  # the exception row
    assert engine.process([fe(comm="rsync", path="/etc/passwd")])  # only the listed path
    assert not engine.process([fe(comm="cron", path="/etc/passwd")])  # appended row
    assert not engine.process([fe(comm="sh")])  # appended condition and list


def test_enabled_false_switches_a_rule_off(tmp_path: Path) -> None:
    a = write(tmp_path, rule("file.path = /etc/shadow"), "a.yaml")
    b = write(tmp_path, "- rule: R\n  enabled: false\n", "b.yaml")
    assert RuleEngine.load([a, b]).rules == []


def test_falco_priority_maps_to_severity(tmp_path: Path) -> None:
    body = "- rule: R\n  condition: op = write\n  output: x\n  priority: WARNING\n"
    assert str(RuleEngine.load(write(tmp_path, body)).rules[0].severity) == "medium"


def test_output_renders_fields_and_terms(tmp_path: Path) -> None:
    body = (
        "- rule: Scan\n  condition: channel = net and distinct(net.dst_port, 60s) >= 2\n"
        "  output: 'scan of %net.dst_ip: %{distinct(net.dst_port,60s)} ports, 100%%'\n"
        "  severity: low\n  by: [zone.id, net.dst_ip]\n"
    )
    engine = RuleEngine.load(write(tmp_path, body))
    alerts = engine.process([ne(port=1), ne(port=2)])
    assert alerts[0].summary == "scan of 10.0.0.9: 2 ports, 100%"
    assert alerts[0].evidence["net.dst_ip"] == "10.0.0.9"


def test_lateral_uses_the_zone_address_context(tmp_path: Path) -> None:
    other = ZoneRef("z2", "db-1", "globex", "qemu")
    same = ZoneRef("z3", "web-2", "acme", "qemu")
    context = RuleContext(zone_addresses=lambda: {"10.0.0.9": other, "10.0.0.7": same})
    path = write(tmp_path, rule("net.dst_other_tenant = true"))
    engine = RuleEngine.load(path, context)
    assert engine.process([ne(dst="10.0.0.9")])
    assert not engine.process([ne(dst="10.0.0.7")])
    assert not engine.process([ne(dst="8.8.8.8")])


def test_stats_rules_read_zonestats(tmp_path: Path) -> None:
    engine = RuleEngine.load(write(tmp_path, rule("kvm.exits_per_vcpu_s > 1000")))
    hot = ZoneStats(1, ZONE, 1.0, vcpus=2, exits_per_s=5000.0)
    cold = ZoneStats(1, ZONE, 1.0, vcpus=8, exits_per_s=5000.0)
    assert engine.process_stats([hot])
    assert not engine.process_stats([cold])


def problems(tmp_path: Path, body: str, head: str = HEAD) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(head + body)
    return [f"{p.where}: {p.message}" for p in load([path]).problems]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (rule("file.pth = /x"), "bad.yaml:3:15: unknown field 'file.pth'"),
        (rule("net.dst_ip cidr 10.0.0.300/8"), "bad.yaml:3:31: bad CIDR '10.0.0.300/8'"),
        (rule("net.dst_ip cidr 10.0.0.1/8"), "has host bits set"),
        (rule("file.ret > abc"), "bad.yaml:3:26: expected a number"),
        (rule("file.path = /x and"), "bad.yaml:3:33: expected a field, macro or '('"),
        (rule('file.path = "x'), "bad.yaml:3:27: unterminated string"),
        (rule("file.path < 3"), "bad.yaml:3:25: '<' does not apply to file.path"),
        (rule("nope"), "bad.yaml:3:15: unknown macro 'nope'"),
        (rule("op = a or count(1m) > 3"), "bad.yaml:3:25: windowed and learned terms"),
        (rule("channel = file and count(1m, x) > 3"), "bad.yaml:3:34: usage: count(window)"),
        (rule("channel = file and count(soon) > 3"), "bad.yaml:3:40: expected a duration"),
        (rule("op = x", extra="  colour: red\n"), "bad.yaml:7:3: unknown key 'colour'"),
        (rule("op = x", extra="  tags: nope\n"), "bad.yaml:7:9: tags must be a list"),
        (rule("op = x", extra="  enabled: maybe\n"), "bad.yaml:7:12: enabled must be true"),
        (rule("op = x", extra="  learn: soon\n"), "bad.yaml:7:10: learn: expected a duration"),
        ("- rule: R\n  condition: x\n", "bad.yaml:2:3: rule 'R' has no output"),
        ("- rule: [\n", "bad.yaml:3:1: invalid YAML"),
        ("- macro: a\n  condition: b\n- macro: b\n  condition: a\n", "macro cycle: a -> b -> a"),
        ("- list: l\n  items: 3\n", "bad.yaml:3:10: items must be a list"),
        ("- thing: 1\n", "bad.yaml:2:3: unknown item"),
        (rule("op = x") + rule("op = y"), "bad.yaml:7:3: rule 'R' is already defined at"),
        ("- rule: Q\n  condition: and op = y\n  override: {condition: append}\n",
         "bad.yaml:2:3: no rule 'Q' to override"),
        (rule("file.path = /x and net.dst_port = 1"), "no channel has all of the fields"),
    ],
)  # fmt: skip
def test_errors_name_file_line_col(tmp_path: Path, body: str, expected: str) -> None:
    found = problems(tmp_path, body)
    assert any(expected in p for p in found), found


def test_positions_inside_folded_block_conditions(tmp_path: Path) -> None:
    body = (
        "- rule: R\n  condition: >\n    op = write\n    and file.path = /x\n"
        "    and file.nme = y\n  output: x\n  severity: low\n"
    )
    (found,) = problems(tmp_path, body)
    assert found.endswith("bad.yaml:6:9: unknown field 'file.nme' (see `zonewatch rules fields`)")


def test_engine_version_is_required_and_checked(tmp_path: Path) -> None:
    assert any(
        "missing `- required_engine_version" in p
        for p in problems(tmp_path, rule("op = x"), head="")
    )
    too_new = problems(tmp_path, rule("op = x"), head="- required_engine_version: 9.0.0\n")
    assert any("bad.yaml:1:28: these rules need engine 9.0.0" in p for p in too_new), too_new


def test_load_raises_one_config_error_listing_all(tmp_path: Path) -> None:
    path = write(tmp_path, rule("file.pth = 1") + rule("x y z").replace("R", "S"))
    with pytest.raises(RulesError) as info:
        RuleEngine.load(path)
    assert len(info.value.problems) == 2
    assert info.value.where.endswith("r.yaml:3:15")
