"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (bundled by
kubernetes-validate, no network), the DaemonSet and the systemd unit grant the same least
privilege, their command lines parse with the real CLI, and the ConfigMap's rules and
tenants load."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from zonewatch.cli import build_parser
from zonewatch.inventory.tenants import load_tenants

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "zonewatch.service"
# What the agent needs (deploy/systemd/zonewatch.service says why, and how it was measured).
CAPABILITIES = {"BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYS_ADMIN"}
KUBERNETES_VERSIONS = ["1.30.0", "1.33.0"]


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((f"{path.name}:{doc['kind']}", doc))
    return out


def kind(name: str) -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc["kind"] == name]
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def agent_container() -> dict[str, Any]:
    containers = kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def unit_settings() -> dict[str, list[str]]:
    """KEY=VALUE lines of the unit (continuation lines joined), values per key in order."""
    text = re.sub(r"\\\n\s*", " ", UNIT.read_text())
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_there_are_manifests_of_every_kind() -> None:
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), documents(), ids=[n for n, _ in documents()])
def test_manifest_validates_against_the_kubernetes_schema(
    name: str, doc: dict[str, Any], version: str
) -> None:
    # strict: unknown fields (a misspelt key) are errors too
    assert kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    doc = kind("DaemonSet")
    spec = doc["spec"]["template"]["spec"]
    spec["hostPid"] = spec.pop("hostPID")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_daemonset_least_privilege() -> None:
    pod = kind("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["hostNetwork"] is True  # plain zones' taps are in the host's network namespace
    assert pod["automountServiceAccountToken"] is False
    sc = agent_container()["securityContext"]
    assert sc.get("privileged") is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPABILITIES


def test_daemonset_mounts() -> None:
    pod = kind("DaemonSet")["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m for m in agent_container()["volumeMounts"]}
    by_host_path = {host[m["name"]]: m for m in mounts.values() if m["name"] in host}
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug", "/lib/modules", "/usr/src"):
        assert path in by_host_path, path
        assert by_host_path[path]["mountPath"] == path  # bcc looks where the host has them
        assert by_host_path[path].get("readOnly") is True, path
    # Writable: only the journal, the socket folder and an in-memory /tmp.
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/var/lib/zonewatch", "/run/zonewatch", "/tmp"}


def test_daemonset_sends_otlp_and_reads_the_configmap() -> None:
    c = agent_container()
    env = {e["name"]: e for e in c["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"].startswith("http")
    config = next(
        v for v in kind("DaemonSet")["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    assert config["configMap"]["name"] == kind("ConfigMap")["metadata"]["name"]
    keys = {i["key"]: i["path"] for i in config["configMap"]["items"]}
    assert set(keys) == set(kind("ConfigMap")["data"])
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
    assert "--metrics=$(NODE_IP):9464" in c["args"]
    # The kubelet expands $(NODE_IP) before the agent parses its arguments.
    expanded = [a.replace("$(NODE_IP)", "10.0.0.7") for a in c["args"]]
    args = build_parser().parse_args(expanded)
    assert args.command == "run"
    assert args.tenants == f"{mount}/{keys['tenants.yaml']}"
    assert f"{mount}/{Path(keys['local.yaml']).parent}" in args.rules
    assert args.metrics == "10.0.0.7:9464"
    assert {e["name"] for e in c["env"]} >= {"NODE_IP"}


def test_configmap_rules_and_tenants_load(tmp_path: Path) -> None:
    data = kind("ConfigMap")["data"]
    (tmp_path / "tenants.yaml").write_text(data["tenants.yaml"])
    tenants = load_tenants(tmp_path / "tenants.yaml")
    assert tenants.tenant_for("acme-web-1", {}) == "acme"
    assert tenants.tenant_for("zone-9", {"tenant": "globex"}) == "globex"
    rules = tmp_path / "local.yaml"
    rules.write_text(data["local.yaml"])
    check = subprocess.run(
        [sys.executable, "-m", "zonewatch", "rules", "check", str(ROOT / "rules"), str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("ok:")


def test_unit_capabilities_match_the_daemonset() -> None:
    s = unit_settings()
    bounding = set(s["CapabilityBoundingSet"][0].split())
    ambient = set(s["AmbientCapabilities"][0].split())
    assert bounding == ambient == {f"CAP_{c}" for c in CAPABILITIES}
    daemonset = set(agent_container()["securityContext"]["capabilities"]["add"])
    assert {c.removeprefix("CAP_") for c in bounding} == daemonset


def test_unit_hardening() -> None:
    s = {k: v[-1] for k, v in unit_settings().items()}
    for key, value in {
        "User": "root",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "RestrictNamespaces": "net",  # setns into pods' network namespaces, nothing else
    }.items():
        assert s.get(key) == value, key
    assert set(s["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    assert "/var/lib/zonewatch" in s["ReadWritePaths"].split()
    assert "ProtectKernelModules" not in s  # it hides /lib/modules: bcc needs the headers


def test_unit_command_line_parses() -> None:
    argv = shlex.split(unit_settings()["ExecStart"][0].replace("$ZONEWATCH_ARGS", ""))
    assert argv[0] == "/usr/local/bin/zonewatch"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    assert args.journal == "/var/lib/zonewatch/journal"
    assert args.metrics == "127.0.0.1:9464"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify checks that ExecStart's binary exists: point it at this checkout's.
    zonewatch = Path(sys.executable).parent / "zonewatch"
    assert zonewatch.exists()
    unit = tmp_path / "zonewatch.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/zonewatch", str(zonewatch)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "zonewatch.service" not in result.stderr, result.stderr  # no warnings either
