"""The tenants file: which tenant each zone belongs to.

```yaml
version: 1
tenants:
  - name: acme
    zones: ["acme-*", "web-?"]     # zone-name globs (fnmatch, case-sensitive)
    labels: {team: payments}       # all must equal the zone's labels
```

An entry matches a zone when any of its globs matches the zone's name, or when its labels
are non-empty and every one equals the zone's label of that key (labels come from the
VMM's command line, e.g. `kata.sandbox`, and from the platform, e.g. `k8s.namespace`).
Entries are tried in order; the first match wins. A zone no entry matches belongs to its
Kubernetes namespace (label `k8s.namespace`) when it has one that is a valid tenant name,
else to `model.DEFAULT_TENANT`.

`TenantsFile` follows a tenants file for the agent: reloaded when it changes and on
request (SIGHUP); a bad new version keeps the running map.

The file is read with PyYAML's composer over SafeLoader and checked node by node, so every
error names the offending node: `ConfigError("PATH:LINE:COL", message)`, 1-based. Unknown
keys, duplicate keys, wrong types, aliases, a missing or unsupported `version` are errors,
never silently ignored: a typo in a tenants file would otherwise put a tenant's zones, and
their alerts, under another tenant.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from yaml.nodes import Node, ScalarNode

from zonewatch.errors import ConfigError
from zonewatch.inventory.platform import LABEL_K8S_NAMESPACE
from zonewatch.model import DEFAULT_TENANT
from zonewatch.yamlfile import (
    MAX_FILE_BYTES,
    MAX_TEXT,
    STR,
    NodeChecker,
    compose,
    is_map,
    is_seq,
    show,
)

__all__ = [
    "MAX_TENANTS_FILE_BYTES",
    "TENANT_NAME_PATTERN",
    "TenantMap",
    "TenantRule",
    "TenantsFile",
    "load_tenants",
]

log = logging.getLogger(__name__)

TENANT_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,63}")
MAX_TENANTS_FILE_BYTES: Final = MAX_FILE_BYTES


def _valid_tenant_name(name: str) -> bool:
    return TENANT_NAME_PATTERN.fullmatch(name) is not None and name not in (".", "..")


@dataclass(slots=True, frozen=True)
class TenantRule:
    """One entry of the tenants file."""

    name: str
    zones: tuple[str, ...] = ()  # zone-name globs
    labels: tuple[tuple[str, str], ...] = ()  # (key, value) pairs that must all equal
    where: str = field(default="", compare=False)  # "path:line:col" of the entry, if loaded
    _globs: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _valid_tenant_name(self.name):
            raise ValueError(f"invalid tenant name {self.name!r}")
        globs = tuple(re.compile(fnmatch.translate(g)) for g in self.zones)
        object.__setattr__(self, "_globs", globs)

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        if any(glob.match(name) for glob in self._globs):
            return True
        return bool(self.labels) and all(k in labels and labels[k] == v for k, v in self.labels)


class TenantMap:
    """Zone -> tenant, by the first matching rule."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[TenantRule] = ()) -> None:
        self._rules = tuple(rules)
        seen: set[str] = set()
        for rule in self._rules:
            if rule.name in seen:
                raise ValueError(f"duplicate tenant name {rule.name!r}")
            seen.add(rule.name)

    @classmethod
    def empty(cls) -> TenantMap:
        """No rules: every zone belongs to the default tenant."""
        return cls()

    @property
    def rules(self) -> tuple[TenantRule, ...]:
        return self._rules

    def rule_for(self, name: str, labels: Mapping[str, str]) -> TenantRule | None:
        """The first rule matching the zone, or None."""
        for rule in self._rules:
            if rule.matches(name, labels):
                return rule
        return None

    def tenant_for(self, name: str, labels: Mapping[str, str]) -> str:
        """The first matching rule's tenant, else the zone's Kubernetes namespace, else
        the default tenant."""
        rule = self.rule_for(name, labels)
        if rule is not None:
            return rule.name
        namespace = labels.get(LABEL_K8S_NAMESPACE, "")
        return namespace if _valid_tenant_name(namespace) else DEFAULT_TENANT

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[TenantRule]:
        return iter(self._rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TenantMap) and self._rules == other._rules

    def __hash__(self) -> int:
        return hash(self._rules)

    def __repr__(self) -> str:
        return f"TenantMap({[r.name for r in self._rules]!r})"


class TenantsFile:
    """A tenants file the agent follows while it runs.

    The agent loop calls `maybe_reload()` often; it looks at the file (one stat: inode,
    size, mtime) at most every `check_interval` seconds and reads it only when that
    changed, or when `request_reload()` asked (safe in a signal handler: it only sets a
    flag). A new version that does not load keeps the running map: `last_error` and one
    log line say why, at its file:line:col.
    """

    __slots__ = ("_next_check", "_requested", "_stamp", "check_interval", "last_error", "path",
                 "reloads", "tenants")  # fmt: skip

    def __init__(self, path: str | Path, check_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.check_interval = check_interval
        self._stamp = self._file_stamp()
        self.tenants = load_tenants(self.path)  # a bad file at start stops the agent
        self.last_error: str | None = None
        self.reloads = 0
        self._requested = False
        self._next_check = time.monotonic() + check_interval

    def _file_stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def request_reload(self) -> None:
        self._requested = True

    def maybe_reload(self) -> TenantMap | None:
        """The new map when the file changed (or a reload was asked) and loads; else None."""
        now = time.monotonic()
        if not self._requested and now < self._next_check:
            return None
        self._next_check = now + self.check_interval
        stamp = self._file_stamp()
        if not self._requested and stamp == self._stamp:
            return None
        self._requested = False
        self._stamp = stamp
        try:
            tenants = load_tenants(self.path)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error("tenants not reloaded, the running tenants stay: %s", exc)
            return None
        self.last_error = None
        self.reloads += 1
        changed = tenants != self.tenants
        self.tenants = tenants
        log.info("tenants reloaded from %s: %d entr%s", self.path, len(tenants),
                 "y" if len(tenants) == 1 else "ies")  # fmt: skip
        return tenants if changed else None


# --------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------
def load_tenants(path: str | Path) -> TenantMap:
    """Read and check a tenants file; ConfigError("PATH:LINE:COL", message) if malformed."""
    where = str(path)
    return _Checker(where).tenants(compose(where, path, "tenants file"))


class _Checker(NodeChecker):
    def tenants(self, root: Node | None) -> TenantMap:
        entries = self.versioned_list(root, "tenants", "tenants file", "tenant entries")
        names: dict[str, Node] = {}
        rules = [self.entry(item, names) for item in entries.value]
        return TenantMap(rules)

    def entry(self, node: Node, names: dict[str, Node]) -> TenantRule:
        if not is_map(node):
            raise self.error(node, "a tenant entry is a mapping with 'name' and 'zones'/'labels'")
        fields = self.keys(node, ("name", "zones", "labels"), "tenant entry")
        if "name" not in fields:
            raise self.error(node, "tenant entry is missing 'name'")
        name_node = fields["name"][1]
        name = self.string(name_node, "tenant name")
        if not _valid_tenant_name(name):
            raise self.error(
                name_node,
                f"invalid tenant name {show(name)}: 1-63 characters of A-Z a-z 0-9 . _ -",
            )
        if name in names:
            first = names[name].start_mark.line + 1
            raise self.error(
                name_node, f"duplicate tenant name {show(name)} (first at line {first})"
            )
        names[name] = name_node

        zones: tuple[str, ...] = ()
        if "zones" in fields:
            zones = self.globs(fields["zones"][1])
        labels: tuple[tuple[str, str], ...] = ()
        if "labels" in fields:
            labels = self.labels(fields["labels"][1])
        if not zones and not labels:
            raise self.error(
                node, f"tenant {show(name)} has no 'zones' and no 'labels': it never matches"
            )
        return TenantRule(name=name, zones=zones, labels=labels, where=self.at(node))

    def globs(self, node: Node) -> tuple[str, ...]:
        if not is_seq(node):
            raise self.error(node, "'zones' must be a list of zone-name globs")
        return tuple(self.string(item, "a zone glob") for item in node.value)

    def labels(self, node: Node) -> tuple[tuple[str, str], ...]:
        if not is_map(node):
            raise self.error(node, "'labels' must be a mapping of label names to values")
        out: list[tuple[str, str]] = []
        for key, (key_node, value_node) in self.keys(node, None, "labels").items():
            if not key or len(key) > MAX_TEXT:
                raise self.error(key_node, "a label name must be 1-1024 characters")
            if not isinstance(value_node, ScalarNode) or value_node.tag != STR:
                raise self.error(
                    value_node, f"label {show(key)}: the value must be a string (quote it)"
                )
            value: str = value_node.value
            if len(value) > MAX_TEXT:
                raise self.error(value_node, f"label {show(key)}: value too long")
            out.append((key, value))
        return tuple(out)
