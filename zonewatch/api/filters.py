"""Stream filters: allow and deny lists per field (allow minus deny), built once per call.

A value passes a field when the allow list is empty or names it, and the deny list does not
name it. Zones match by name or id. Tags: an alert passes when the allow list is empty or
names one of its tags, and the deny list names none of them. Severity: at least
min_severity. Tenants are narrowed to the caller's token scope first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from zonewatch.api.auth import Principal
from zonewatch.model import Alert, Severity, ZoneRef


@dataclass(slots=True, frozen=True)
class AllowDeny:
    allow: frozenset[str] | None = None  # None: everything
    deny: frozenset[str] = frozenset()

    @classmethod
    def of(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> AllowDeny:
        allowed = frozenset(allow)
        return cls(allowed or None, frozenset(deny))

    def passes(self, value: str) -> bool:
        return (self.allow is None or value in self.allow) and value not in self.deny

    def passes_any(self, values: Iterable[str]) -> bool:
        """For zones (name or id) and tags: some value allowed, none denied."""
        values = tuple(values)
        if self.deny and any(v in self.deny for v in values):
            return False
        return self.allow is None or any(v in self.allow for v in values)


@dataclass(slots=True, frozen=True)
class AlertMatcher:
    tenants: AllowDeny = AllowDeny()
    zones: AllowDeny = AllowDeny()
    min_severity: Severity = Severity.INFO
    rules: AllowDeny = AllowDeny()
    tags: AllowDeny = AllowDeny()

    def zone_visible(self, zone: ZoneRef) -> bool:
        return self.tenants.passes(zone.tenant) and self.zones.passes_any((zone.name, zone.id))

    def __call__(self, alert: Alert) -> bool:
        return (
            alert.severity >= self.min_severity
            and self.zone_visible(alert.zone)
            and self.rules.passes(alert.rule)
            and self.tags.passes_any(alert.tags)
        )


def scoped(principal: Principal, allow: Iterable[str], deny: Iterable[str] = ()) -> AllowDeny:
    """The tenants a caller may see: its allow list within its token's scope.
    Raises PermissionError when the allow list names a tenant outside the scope."""
    scope = principal.scope(allow)
    return AllowDeny(scope, frozenset(deny))


def matcher_from_pb(principal: Principal, f: Any) -> AlertMatcher:
    """From a zonewatch.v1.AlertFilter message."""
    return AlertMatcher(
        tenants=scoped(principal, f.tenants.allow, f.tenants.deny),
        zones=AllowDeny.of(f.zones.allow, f.zones.deny),
        min_severity=Severity(f.min_severity) if f.min_severity else Severity.INFO,
        rules=AllowDeny.of(f.rules.allow, f.rules.deny),
        tags=AllowDeny.of(f.tags.allow, f.tags.deny),
    )
