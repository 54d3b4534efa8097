"""The loader never crashes: random condition texts and random YAML structures only ever
yield problems that name file:line:col."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zonewatch.rules.loader import load

WHERE = re.compile(r".+:\d+:\d+$")
TOKENS = ["and", "or", "not", "(", ")", ",", "=", "!=", "<", ">=", "in", "contains",
          "startswith", "glob", "cidr", "exists", "file.path", "net.dst_ip", "net.dst_port",
          "proc.comm", "op", "channel", "count(10s)", "distinct(net.dst_port, 1m)",
          "first_seen(net.dns_qname)", "baseline_ratio(sum(net.bytes, 5m))", "'quoted",
          '"x"', "10.0.0.0/8", "/etc/shadow", "42", "-1", "true", "m", "l", "file", "%",
          "\\", "\n", "é", "!"]  # fmt: skip
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def assert_only_positioned_problems(path: Path) -> None:
    loaded = load([path])  # must not raise
    for problem in loaded.problems:
        assert WHERE.match(problem.where), problem.where
        assert problem.message and "\n" not in problem.message.strip()


@SETTINGS
@given(st.lists(st.sampled_from(TOKENS) | st.text(max_size=6), max_size=14))
def test_random_conditions(tmp_path: Path, tokens: list[str]) -> None:
    condition = " ".join(tokens)
    doc = [
        {"required_engine_version": 1},
        {"list": "l", "items": ["a", "b"]},
        {"macro": "m", "condition": "op = write"},
        {"rule": "R", "condition": condition, "output": "%file.path " + condition,
         "severity": "high"},
    ]  # fmt: skip
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    assert_only_positioned_problems(path)


KEYS = ["rule", "macro", "list", "condition", "output", "severity", "priority", "items",
        "tags", "enabled", "exceptions", "by", "learn", "dedup", "append", "override",
        "required_engine_version", "name", "fields", "comps", "values", "desc"]  # fmt: skip
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["op = x", "and op = y", "file.path", "append", "replace", "60s", "high"])
)
structures = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=25,
)


@SETTINGS
@given(structures)
def test_random_yaml_structures(tmp_path: Path, data: object) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert_only_positioned_problems(path)


@SETTINGS
@given(st.text(max_size=200))
def test_random_bytes_as_a_rules_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_only_positioned_problems(path)
