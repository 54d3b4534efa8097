"""YAML configuration files checked node by node, so every error names its place.

A file is read whole (bounded, UTF-8), composed with PyYAML's composer over SafeLoader
(aliases refused), and then checked by a `NodeChecker` that raises
`ConfigError("PATH:LINE:COL", message)`, 1-based, for unknown or duplicate keys and wrong
types. The tenants file (zonewatch.inventory.tenants) and the tokens file
(zonewatch.api.auth) are read this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, TypeGuard

import yaml
from yaml.composer import ComposerError
from yaml.error import Mark
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from zonewatch.errors import ConfigError

MAX_FILE_BYTES: Final = 4 * 1024 * 1024
MAX_TEXT: Final = 1024  # one string value

STR: Final = "tag:yaml.org,2002:str"
INT: Final = "tag:yaml.org,2002:int"
MAP: Final = "tag:yaml.org,2002:map"
SEQ: Final = "tag:yaml.org,2002:seq"


class NoAliasLoader(yaml.SafeLoader):
    """SafeLoader's composer, refusing aliases where they appear (an alias would share one
    node between places, and the error would otherwise point at the anchor)."""

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(AliasEvent):
            event: AliasEvent = self.peek_event()  # type: ignore[no-untyped-call]
            mark = event.start_mark if isinstance(event.start_mark, Mark) else None
            raise ComposerError(None, None, "anchors and aliases are not supported here", mark)
        return super().compose_node(parent, index)


def compose(where: str, path: str | Path, what: str) -> Node | None:
    """The file's root node (None when empty); ConfigError("PATH:LINE:COL", ...) when it
    cannot be read or is not YAML. `what` names the file in messages ("tenants file")."""
    text = read_text(where, path, what)
    try:
        loader = NoAliasLoader(text)
    except ReaderError as exc:  # a character YAML does not allow
        line, col = line_col(text, exc.position)
        raise ConfigError(f"{where}:{line}:{col}", f"not YAML: {exc.reason}") from exc
    try:
        root: Node | None = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise ConfigError(f"{where}:{line}:{col}", f"not YAML: {message}") from exc
    except ReaderError as exc:
        line, col = line_col(text, exc.position)
        raise ConfigError(f"{where}:{line}:{col}", f"not YAML: {exc.reason}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}:1:1", f"not YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where}:1:1", "not YAML we accept: nested too deeply") from exc
    finally:
        loader.dispose()
    return root


def read_text(where: str, path: str | Path, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{where}:1:1", f"cannot read the {what}: {reason}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}:1:1", f"{what} larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{where}:{line}:{col}", "not UTF-8 text") from exc
    return text.removeprefix("\ufeff")


def line_col(text: str, position: int) -> tuple[int, int]:
    position = max(0, min(position, len(text)))
    line = text.count("\n", 0, position) + 1
    return line, position - (text.rfind("\n", 0, position) + 1) + 1


def is_map(node: Node | None) -> TypeGuard[MappingNode]:
    """A plain mapping: no !!omap, !!set or application tag."""
    return isinstance(node, MappingNode) and node.tag == MAP


def is_seq(node: Node | None) -> TypeGuard[SequenceNode]:
    return isinstance(node, SequenceNode) and node.tag == SEQ


def show(text: str) -> str:
    """A user's string, quoted and bounded, safe to print in one line."""
    return repr(text if len(text) <= 60 else text[:60] + "...")


class NodeChecker:
    """Checks the nodes of one file; every error names the node's place."""

    def __init__(self, where: str) -> None:
        self.where = where

    def at(self, node: Node | None) -> str:
        if node is None:
            return f"{self.where}:1:1"
        mark = node.start_mark
        return f"{self.where}:{mark.line + 1}:{mark.column + 1}"

    def error(self, node: Node | None, message: str) -> ConfigError:
        return ConfigError(self.at(node), message)

    def keys(
        self, node: MappingNode, allowed: tuple[str, ...] | None, what: str
    ) -> dict[str, tuple[ScalarNode, Node]]:
        out: dict[str, tuple[ScalarNode, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag != STR:
                shown = show(key_node.value) if isinstance(key_node, ScalarNode) else "this"
                raise self.error(key_node, f"{what}: keys must be strings, not {shown} (quote it)")
            key = key_node.value
            if key in out:
                raise self.error(key_node, f"{what}: duplicate key {show(key)}")
            if allowed is not None and key not in allowed:
                raise self.error(
                    key_node,
                    f"{what}: unknown key {show(key)} (expected {', '.join(allowed)})",
                )
            out[key] = (key_node, value_node)
        return out

    def string(self, node: Node, what: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag != STR:
            shown = f" {show(node.value)}" if isinstance(node, ScalarNode) else ""
            raise self.error(node, f"{what} must be a string, not{shown or ' a collection'}")
        value: str = node.value
        if not value:
            raise self.error(node, f"{what} must not be empty")
        if len(value) > MAX_TEXT:
            raise self.error(node, f"{what} is longer than {MAX_TEXT} characters")
        return value

    def versioned_list(self, root: Node | None, key: str, what: str, items: str) -> SequenceNode:
        """The list under `key` of a file `{version: 1, KEY: [...]}` (`what`: "tenants file",
        `items`: "tenant entries")."""
        if root is None:
            raise self.error(None, f"empty {what}: expected 'version: 1' and '{key}:'")
        if not is_map(root):
            raise self.error(root, f"a {what} is a mapping with 'version' and '{key}'")
        top = self.keys(root, ("version", key), what)
        if "version" not in top:
            raise self.error(root, "missing 'version' (this format is 'version: 1')")
        version = top["version"][1]
        if not (isinstance(version, ScalarNode) and version.tag == INT and version.value == "1"):
            shown = show(version.value) if isinstance(version, ScalarNode) else "a collection"
            raise self.error(version, f"unsupported version {shown}: expected 1")
        if key not in top:
            raise self.error(root, f"missing '{key}' (a list of {items})")
        entries = top[key][1]
        if not is_seq(entries):
            raise self.error(entries, f"'{key}' must be a list of {items}")
        return entries
