"""Who reports: the host the agent runs on, and the ids outputs derive from it.

Ids of findings are deterministic, host-scoped UUIDs (UUIDv5): the same alert exported again
(a re-export of the journal, a second sink) keeps its id, so a SIEM de-duplicates it, while
two hosts never share one. The host part is the machine id (/etc/machine-id) and the host
name: both outlive a reboot, as the journal and its seqs do (the boot id does not: an alert
re-exported after a reboot would change id), and the name still tells apart hosts cloned
from one image (same machine id) or a container without a machine id. The alert part is its
seq and its timestamp in ns, so a seq a wiped journal issues again is a new finding.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

# Fixed namespaces: the same inputs give the same UUID in every version of the agent.
RULE_NAMESPACE = uuid.UUID("5b0c3d4e-6f1a-4c8b-9e2d-7a1f0c3b5d6e")  # security_rule.uuid
FINDING_NAMESPACE = uuid.UUID("8d3f6c2a-1b7e-4f0d-a5c9-2e4b6d8f0a13")
CORRELATION_NAMESPACE = uuid.UUID("c41e9a07-5d2b-4e83-9f6a-0b7d3c5e8a21")

MACHINE_ID = Path("/etc/machine-id")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True, slots=True)
class HostIdentity:
    hostname: str
    machine_id: str  # "" when the host (or the agent's container) has none
    boot_id: str
    kernel_release: str

    @property
    def scope(self) -> str:
        """What makes this host's ids its own: machine id and name."""
        return f"{self.machine_id}\0{self.hostname}"

    @classmethod
    def current(cls) -> HostIdentity:
        return cls(
            hostname=socket.gethostname(),
            machine_id=_read_id(MACHINE_ID),
            boot_id=_read_id(BOOT_ID),
            kernel_release=os.uname().release,
        )


def _read_id(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


def rule_uid(rule: str) -> str:
    """The rule's UUID: the same name gives the same UUID on every host."""
    return str(uuid.uuid5(RULE_NAMESPACE, rule))


def finding_uid(host: HostIdentity, seq: int, ts_ns: int) -> str:
    return str(uuid.uuid5(FINDING_NAMESPACE, f"{host.scope}\0{seq}\0{ts_ns}"))


def correlation_uid(host: HostIdentity, rule: str, zone_id: str) -> str:
    """One id for every finding of one rule on one zone incarnation of one host."""
    return str(uuid.uuid5(CORRELATION_NAMESPACE, f"{host.scope}\0{rule}\0{zone_id}"))
