"""Network namespaces the net probe watches taps in.

A Kata pod's VMM and its tap live in the pod's namespace: the probe enters it through the
VMM's /proc/PID/ns/net and keeps that file open while its filters are there, so they can be
removed after the VMM (and its pid) is gone. Entering costs a fork in pyroute2 (11-15 ms):
callers do it only when something changed there.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from zonewatch.model import NetNs


def own_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


class Namespace:
    """The agent's own network namespace, or one held open by an fd."""

    def __init__(self, inode: int, fd: int | None, where: str) -> None:
        self.inode = inode
        self.fd = fd
        self.where = where  # for messages

    @classmethod
    def own(cls) -> Namespace:
        return cls(own_inode(), None, "the host's network namespace")

    @classmethod
    def open(cls, ns: NetNs) -> Namespace:
        """Raises OSError when the path no longer names the zone's namespace (its VMM gone
        and the pid reused, say)."""
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            inode = os.fstat(fd).st_ino
            if inode != ns.inode:
                raise OSError(errno.ESTALE, f"{ns.path} is now namespace {inode}, not {ns.inode}")
        except OSError:
            os.close(fd)
            raise
        return cls(ns.inode, fd, f"network namespace {ns.inode}")

    def route(self) -> Any:
        """A pyroute2 IPRoute whose socket lives in this namespace (close it after use)."""
        from pyroute2 import IPRoute

        if self.fd is None:
            return IPRoute()
        return IPRoute(netns=self.fd, flags=0)  # flags=0: never create a namespace

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
