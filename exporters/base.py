"""The one interface every sink implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class JsonRecord(Protocol):
    """Anything with the JSON-lines shape of shared/design.md."""

    def to_json(self) -> dict[str, Any]: ...


class Sink(Protocol):
    name: str

    def export(self, records: Sequence[JsonRecord]) -> None: ...
    def flush(self) -> None: ...
    def shutdown(self) -> None: ...
