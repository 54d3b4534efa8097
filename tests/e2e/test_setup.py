"""`make setup` is idempotent: run again, it changes nothing and says only that it is ready."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fingerprint() -> dict[str, tuple[int, int]]:
    """(size, mtime) of everything setup makes: the venv, the lab cache, the header links."""
    cache = Path(os.environ.get("ZONEWATCH_LAB_CACHE", "/var/cache/zonewatch/lab"))
    kdir = Path(f"/lib/modules/{os.uname().release}")
    out: dict[str, tuple[int, int]] = {}
    for top in (ROOT / ".venv", cache, kdir):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in (*dirnames, *filenames):
                path = Path(dirpath) / name
                st = path.lstat()
                out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


def test_setup_twice_changes_nothing() -> None:
    subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, check=True, capture_output=True)
    before = fingerprint()
    result = subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout == "setup: ready\n"
    after = fingerprint()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, sorted(changed)[:20]
