"""MITRE ATT&CK from rule tags: technique ids (`T1611`, `T1136.001`) and tactic tags
(`mitre_persistence`), as the rules write them (maturity, then domain, then MITRE).

Names are given for the tactics (all 14 of ATT&CK Enterprise) and for the techniques the
default rules name; a technique not in the table keeps its id alone, never a guessed name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TECHNIQUE = re.compile(r"^T\d{4}(\.\d{3})?$")
TACTIC_PREFIX = "mitre_"
MATURITY_PREFIX = "maturity_"

# tactic tag (after "mitre_") -> (tactic id, name)
TACTICS: dict[str, tuple[str, str]] = {
    "reconnaissance": ("TA0043", "Reconnaissance"),
    "resource_development": ("TA0042", "Resource Development"),
    "initial_access": ("TA0001", "Initial Access"),
    "execution": ("TA0002", "Execution"),
    "persistence": ("TA0003", "Persistence"),
    "privilege_escalation": ("TA0004", "Privilege Escalation"),
    "defense_evasion": ("TA0005", "Defense Evasion"),
    "credential_access": ("TA0006", "Credential Access"),
    "discovery": ("TA0007", "Discovery"),
    "lateral_movement": ("TA0008", "Lateral Movement"),
    "collection": ("TA0009", "Collection"),
    "command_and_control": ("TA0011", "Command and Control"),
    "exfiltration": ("TA0010", "Exfiltration"),
    "impact": ("TA0040", "Impact"),
}

# ATT&CK Enterprise names of the techniques and sub-techniques the default rules use.
TECHNIQUE_NAMES: dict[str, str] = {
    "T1003": "OS Credential Dumping",
    "T1014": "Rootkit",
    "T1021": "Remote Services",
    "T1041": "Exfiltration Over C2 Channel",
    "T1046": "Network Service Discovery",
    "T1048": "Exfiltration Over Alternative Protocol",
    "T1053": "Scheduled Task/Job",
    "T1053.003": "Cron",
    "T1055": "Process Injection",
    "T1055.008": "Ptrace System Calls",
    "T1059": "Command and Scripting Interpreter",
    "T1068": "Exploitation for Privilege Escalation",
    "T1071": "Application Layer Protocol",
    "T1071.004": "DNS",
    "T1098": "Account Manipulation",
    "T1098.004": "SSH Authorized Keys",
    "T1136": "Create Account",
    "T1136.001": "Local Account",
    "T1210": "Exploitation of Remote Services",
    "T1485": "Data Destruction",
    "T1486": "Data Encrypted for Impact",
    "T1499": "Endpoint Denial of Service",
    "T1547": "Boot or Logon Autostart Execution",
    "T1547.006": "Kernel Modules and Extensions",
    "T1548": "Abuse Elevation Control Mechanism",
    "T1552": "Unsecured Credentials",
    "T1552.005": "Cloud Instance Metadata API",
    "T1562": "Impair Defenses",
    "T1562.006": "Indicator Blocking",
    "T1568": "Dynamic Resolution",
    "T1571": "Non-Standard Port",
    "T1611": "Escape to Host",
    "T1620": "Reflective Code Loading",
}


@dataclass(frozen=True, slots=True)
class Ref:
    """An ATT&CK id with its name ("" when not in the tables above)."""

    uid: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Technique:
    technique: Ref  # the parent technique of a sub-technique
    sub_technique: Ref | None = None


def techniques(tags: tuple[str, ...] | list[str]) -> list[Technique]:
    """The technique tags, in order, each split into technique and sub-technique."""
    out: list[Technique] = []
    for tag in tags:
        if not TECHNIQUE.match(tag):
            continue
        parent = tag.split(".")[0]
        sub = Ref(tag, TECHNIQUE_NAMES.get(tag, "")) if "." in tag else None
        out.append(Technique(Ref(parent, TECHNIQUE_NAMES.get(parent, "")), sub))
    return out


def tactics(tags: tuple[str, ...] | list[str]) -> list[Ref]:
    """The tactic tags (`mitre_<tactic>`) that name an ATT&CK tactic, in order."""
    out: list[Ref] = []
    for tag in tags:
        if not tag.startswith(TACTIC_PREFIX):
            continue
        known = TACTICS.get(tag.removeprefix(TACTIC_PREFIX))
        if known is not None:
            out.append(Ref(*known))
    return out


def domains(tags: tuple[str, ...] | list[str]) -> list[str]:
    """The tags that are neither maturity nor ATT&CK (zone, filesystem, network, ...)."""
    return [
        t
        for t in tags
        if not t.startswith((MATURITY_PREFIX, TACTIC_PREFIX)) and not TECHNIQUE.match(t)
    ]


def url(uid: str) -> str:
    """The ATT&CK page of a technique, sub-technique (T1098.004) or tactic (TA0003)."""
    kind = "tactics" if uid.startswith("TA") else "techniques"
    return f"https://attack.mitre.org/{kind}/{uid.replace('.', '/')}/"
