"""Fixtures of the resilience suite: a tokens file, a small tmpfs, agent resource readings.

Every fixture undoes what it made (mounts, processes) whether the test passed or not."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

TOKENS = """version: 1
tokens:
  - name: all
    token: admin-token-0001
    tenants: ["*"]
"""
ADMIN = "admin-token-0001"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS)
    path.chmod(0o600)
    return path


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a disk that fills up for real."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "zw-resilience", mnt],
                   check=True)  # fmt: skip
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], check=False).returncode != 0:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["umount", "-l", mnt], check=True)
