"""Fuzzing the rules loader with files shaped like rules: lists naming lists, macros naming
macros (cycles, doubling, long chains), deep parentheses and `not`s, huge ors, appends.
Whatever comes in, the loader answers with positioned problems or compiled rules: never a
traceback, and within a fixed budget of time and memory per file."""

from __future__ import annotations

import re
import time
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zonewatch.model import FileEvent, ZoneRef
from zonewatch.rules.engine import RuleEngine
from zonewatch.rules.loader import load

WHERE = re.compile(r".+:\d+:\d+$")
SECONDS_PER_FILE = 2.0  # CPU time; ~0.3 s for the largest generated (~100 KB)
BYTES_PER_FILE = 64 * 2**20  # peak allocated while loading one file (tracemalloc)
MACROS = [f"m{i}" for i in range(6)]
LISTS = [f"l{i}" for i in range(4)]
VALID = [
    "file.path = /a", "file.path = /b", "file.path != /c", "file.ret > 2", "file.path exists",
    "file.path in (l0)", "file.path in (l1, l2)", "file.path startswith (l3)", "true", "false",
    "file.path glob '/x/*'", *MACROS, *MACROS,
]  # fmt: skip
JUNK = ["net.dst_port = 53", "count(10s) > 3", "first_seen(file.path)", "nope",
        "file.pth = 1", "(", ")", "and", "or", "not", *LISTS]  # fmt: skip
LEAVES = VALID * 6 + JUNK  # mostly files that load, so that what loads is also run
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Leaves that are big on their own; composed, they stay under ~100 KB of text: the bounds
# below hold per file of that size (time and memory grow with the text beyond that).
big_leaves = st.one_of(
    st.tuples(st.sampled_from(LEAVES), st.integers(1, 64)).map(
        lambda t: " or ".join([f"({t[0]})"] * t[1])
    ),
    st.integers(1, 400).map(lambda n: "(" * n + "file.path = /p" + ")" * n),
    st.integers(1, 1100).map(lambda n: " or ".join(f"file.path = /p{i}" for i in range(n))),
)
conditions = st.recursive(
    st.sampled_from(LEAVES) | st.sampled_from(LEAVES) | big_leaves,
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda t: f"({t[0]} or {t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"{t[0]} and {t[1]}"),
        inner.map(lambda c: f"not {c}"),
    ),
    max_leaves=6,
)
list_items = st.lists(st.sampled_from(["a", "/etc/x", "'q'", *LISTS]), max_size=40)


@st.composite
def rules_files(draw: st.DrawFn) -> str:
    lines = ["- required_engine_version: 1"]
    for name in draw(st.lists(st.sampled_from(LISTS), max_size=4, unique=True)):
        lines.append(f"- list: {name}\n  items: [{', '.join(draw(list_items))}]")
    for name in draw(st.lists(st.sampled_from(MACROS), max_size=6, unique=True)):
        condition = draw(conditions).replace("'", "''")
        lines.append(f"- macro: {name}\n  condition: '{condition}'")
    for i in range(draw(st.integers(0, 4))):
        condition = draw(conditions).replace("'", "''")
        lines.append(
            f"- rule: r{i}\n  condition: 'channel = file and {condition}'\n"
            "  output: '%file.path'\n  severity: high"
        )
        for _ in range(draw(st.integers(0, 3))):
            extra = draw(conditions).replace("'", "''")
            lines.append(f"- rule: r{i}\n  condition: 'or {extra}'\n"
                         "  override: {condition: append}")  # fmt: skip
    return "\n".join(lines) + "\n"


HEAD = "- required_engine_version: 1\n"
RULE = "- rule: r\n  condition: channel = file and {}\n  output: x\n  severity: high\n"
# The shapes that took the agent down, always among the examples (a seed corpus).
IOC_OR = HEAD + RULE.format("(" + " or ".join(f"file.path = /p{i}" for i in range(1050)) + ")")
DOUBLING = (
    HEAD
    + "- macro: m0\n  condition: file.path = /a\n"
    + "".join(f"- macro: m{i}\n  condition: (m{i - 1} or m{i - 1})\n" for i in range(1, 23))
    + RULE.format("m22")
)
NESTED = (
    HEAD
    + "- macro: m0\n  condition: file.path = /a\n"
    + "".join(f"- macro: m{i}\n  condition: m{i - 1}\n" for i in range(1, 300))
    + RULE.format("m299")
)


@SETTINGS
@example(IOC_OR)
@example(DOUBLING)
@example(NESTED)
@given(rules_files())
def test_the_loader_stays_within_its_budget(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    started = time.process_time()  # CPU seconds: other work on the machine doesn't count
    loaded = load([path])  # must not raise
    elapsed = time.process_time() - started
    assert elapsed < SECONDS_PER_FILE, f"{elapsed:.2f} s"
    tracemalloc.start()  # again, for the memory: tracing slows loading several times
    try:
        load([path])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < BYTES_PER_FILE, f"{peak / 2**20:.1f} MiB"
    for problem in loaded.problems:
        assert WHERE.match(problem.where), problem.where
        assert problem.message and "\n" not in problem.message.strip()
    if not loaded.problems:  # what loads also runs: no rule raises on an event
        engine = RuleEngine.load(path)
        zone = ZoneRef("z", "z", "t", "qemu")
        engine.process([FileEvent(1, zone, "open", p, "/srv" + p, 1, 1, "sh", ret=3)
                        for p in ("/a", "/b", "/p", "/x/y", "/etc/x")])  # fmt: skip
        assert engine.counters.rules_disabled == 0
