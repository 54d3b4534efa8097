"""A command in a detached tmux session of a fixed size: what a user at a terminal sees."""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Tmux:
    """One detached tmux session running a command at width x height; `kill()` ends it.
    The command's exit status lands in <workdir>/<session>.exit."""

    def __init__(
        self,
        command: list[str],
        workdir: Path,
        *,
        width: int = 80,
        height: int = 24,
        prefix: str = "zw-tui",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.exit_file = workdir / f"{self.name}.exit"
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        run = f"env {assigns} {shlex.join(command)}" if assigns else shlex.join(command)
        script = f"{run}; echo $? > {shlex.quote(str(self.exit_file))}"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
             "-c", str(ROOT), "sh", "-c", script],
            check=True,
        )  # fmt: skip

    def screen(self) -> str:
        out = subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", self.name],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout

    def pane_pid(self) -> int:
        out = subprocess.run(
            ["tmux", "display-message", "-p", "-t", self.name, "#{pane_pid}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip())

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait(self, predicate: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        """Poll the pane until `predicate` holds (there is no event to await in a pane)."""
        deadline = time.monotonic() + timeout
        screen = self.screen()
        while not self._holds(predicate, screen):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the pane shows:\n{screen}")
            time.sleep(0.1)
            screen = self.screen()
        return screen

    @staticmethod
    def _holds(predicate: Callable[[str], bool], screen: str) -> bool:
        try:
            return predicate(screen)
        except (IndexError, StopIteration):  # caught mid-redraw: a line is not there yet
            return False

    def exit_status(self) -> int | None:
        """The command's exit status once it has exited, else None."""
        try:
            text = self.exit_file.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    def wait_exit(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while (status := self.exit_status()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the UI did not exit; the pane shows:\n{self.screen()}")
            time.sleep(0.1)
        return status

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False,
                       capture_output=True)  # fmt: skip
