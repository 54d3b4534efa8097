"""Labels a zone gets from the platform that started it: Kubernetes, through containerd.

For every pod sandbox, containerd writes the OCI bundle the runtime (Kata's shim) is given
at `<bundle root>/<sandbox id>/config.json`, with the CRI plugin's annotations:

    io.kubernetes.cri.sandbox-namespace  -> label k8s.namespace
    io.kubernetes.cri.sandbox-name       -> label k8s.pod.name
    io.kubernetes.cri.sandbox-uid        -> label k8s.pod.uid

A Kata zone's sandbox id is its `kata.sandbox` label (from the VMM's command line). The
file is not ours and its values are a tenant's choice (pod names): it is read bounded,
values are escaped and cut like every other label, and a malformed file is logged once
and means no labels, never a crash.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from zonewatch.inventory.cmdline import LABEL_KATA_SANDBOX, MAX_NAME_LEN, kata_sandbox_id
from zonewatch.model import utf8_text, visible_char

__all__ = [
    "CRI_ANNOTATION_LABELS",
    "CRI_BUNDLE_ROOT",
    "LABEL_K8S_NAMESPACE",
    "LABEL_K8S_POD_NAME",
    "LABEL_K8S_POD_UID",
    "MAX_BUNDLE_CONFIG_BYTES",
    "OTEL_K8S_ATTRIBUTES",
    "CriBundles",
    "cri_labels",
]

log = logging.getLogger(__name__)

CRI_BUNDLE_ROOT: Final = Path("/run/containerd/io.containerd.runtime.v2.task/k8s.io")
LABEL_K8S_NAMESPACE: Final = "k8s.namespace"
LABEL_K8S_POD_NAME: Final = "k8s.pod.name"
LABEL_K8S_POD_UID: Final = "k8s.pod.uid"
CRI_ANNOTATION_LABELS: Final = {
    "io.kubernetes.cri.sandbox-namespace": LABEL_K8S_NAMESPACE,
    "io.kubernetes.cri.sandbox-name": LABEL_K8S_POD_NAME,
    "io.kubernetes.cri.sandbox-uid": LABEL_K8S_POD_UID,
}
# The same, as OpenTelemetry's semantic conventions name them (OTLP attributes).
OTEL_K8S_ATTRIBUTES: Final = {
    LABEL_K8S_NAMESPACE: "k8s.namespace.name",
    LABEL_K8S_POD_NAME: "k8s.pod.name",
    LABEL_K8S_POD_UID: "k8s.pod.uid",
}
# An OCI config is a few KiB; the sandbox's holds no container spec of size.
MAX_BUNDLE_CONFIG_BYTES: Final = 1024 * 1024


def cri_labels(config: bytes, where: str) -> dict[str, str]:
    """The k8s.* labels in a sandbox bundle's config.json; ValueError("WHERE: why") when
    it is no OCI config we can read."""
    if len(config) > MAX_BUNDLE_CONFIG_BYTES:
        raise ValueError(f"{where}: larger than {MAX_BUNDLE_CONFIG_BYTES} bytes")
    try:
        document = json.loads(config)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{where}: not JSON: {_one_line(str(exc))}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{where}: not a JSON object")
    annotations = document.get("annotations", {})
    if not isinstance(annotations, dict):
        raise ValueError(f"{where}: 'annotations' is not an object")
    labels: dict[str, str] = {}
    for annotation, label in CRI_ANNOTATION_LABELS.items():
        value = annotations.get(annotation)
        if isinstance(value, str) and value:
            labels[label] = _label_value(value)
    return labels


def _label_value(text: str) -> str:
    """A label value fit for every output: valid UTF-8, control characters escaped, cut."""
    text = utf8_text(text[: MAX_NAME_LEN * 4])
    if not text.isprintable():
        text = "".join(c if c.isprintable() else visible_char(c) for c in text)
    return text[:MAX_NAME_LEN]


def _one_line(text: str) -> str:
    return _label_value(text.replace("\n", " "))


@dataclass(slots=True, frozen=True)
class _Read:
    stamp: tuple[int, int, int]  # (inode, size, mtime ns): a rewritten file is read again
    labels: dict[str, str]


class CriBundles:
    """The k8s labels of each Kata sandbox, from containerd's bundles under `root`.

    `labels_for(sandbox)` stats the sandbox's config.json each call (cheap) and reads it
    again only when it changed, so a bundle written after the VMM started is still found.
    """

    __slots__ = ("_read", "_reported", "root")

    def __init__(self, root: Path = CRI_BUNDLE_ROOT) -> None:
        self.root = root
        self._read: dict[str, _Read] = {}
        self._reported: set[tuple[str, tuple[int, int, int]]] = set()  # errors logged once

    def labels_for(self, labels: dict[str, str]) -> dict[str, str]:
        """The platform's labels for a zone whose own labels are `labels`; {} if none."""
        sandbox = labels.get(LABEL_KATA_SANDBOX, "")
        # The id names a directory: only what Kata itself accepts as one, never a path.
        if not sandbox or kata_sandbox_id(f"/run/vc/vm/{sandbox}") != sandbox:
            return {}
        path = self.root / sandbox / "config.json"
        try:
            st = os.stat(path)
        except OSError:
            self._read.pop(sandbox, None)
            return {}
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._read.get(sandbox)
        if cached is not None and cached.stamp == stamp:
            return dict(cached.labels)
        found = self._load(path, stamp)
        self._read[sandbox] = _Read(stamp, found)
        return dict(found)

    def forget(self, live_sandboxes: set[str]) -> None:
        """Drop what is cached for sandboxes that are gone."""
        for sandbox in self._read.keys() - live_sandboxes:
            del self._read[sandbox]

    def _load(self, path: Path, stamp: tuple[int, int, int]) -> dict[str, str]:
        try:
            return cri_labels(_read_regular_file(path, MAX_BUNDLE_CONFIG_BYTES + 1), str(path))
        except (OSError, ValueError) as exc:
            key = (str(path), stamp)
            if key not in self._reported:
                if len(self._reported) >= _MAX_REPORTED:
                    self._reported.clear()
                self._reported.add(key)
                log.warning("no k8s labels from a sandbox bundle: %s", _one_line(str(exc)))
            return {}


_MAX_REPORTED: Final = 4096  # bad files remembered (so each is logged once)


def _read_regular_file(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file; a FIFO or device is refused, not waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        return f.read(limit)
