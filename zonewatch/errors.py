"""Errors that end a command with one clear line (and exit code 2), never a traceback."""

from __future__ import annotations


class ZonewatchError(Exception):
    """A user-facing error: `where` names the file, option or source the problem came from."""

    exit_code = 2

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


class ConfigError(ZonewatchError):
    """Malformed configuration, tenants file or command-line option."""


class EnvironmentProblem(ZonewatchError):
    """The host lacks something the command needs (root, tracefs, bcc, KVM, ...)."""
