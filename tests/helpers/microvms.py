"""Micro-VMM zones started by tests, every one stopped however the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zonewatch.lab.microvm import MicroVmProcess

MicroVmFactory = Callable[..., MicroVmProcess]


@contextmanager
def microvms(stats_dir: Path) -> Iterator[MicroVmFactory]:
    """A factory start(name, **MicroVmProcess options) -> a started micro-VMM."""
    started: list[MicroVmProcess] = []

    def start(name: str, **kwargs: Any) -> MicroVmProcess:
        proc = MicroVmProcess(name, stats=stats_dir / f"{name}.json", **kwargs)
        started.append(proc)
        return proc.start()

    try:
        yield start
    finally:
        for proc in started:
            proc.close()
