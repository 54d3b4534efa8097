"""Reading the counting channels' kernel maps, and their sampled records, from user space."""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from zonewatch.probes.records import DecodeErrors, decode_all

log = logging.getLogger(__name__)

R = TypeVar("R")
MAX_RECORD_SIZES = 16  # distinct record sizes whose array type is kept


class MapReader:
    """Reads whole BPF hash maps: in batches (BPF_MAP_LOOKUP_BATCH) where the kernel and bcc
    can, else entry by entry.

    Batches cost 0.4-0.9 us per entry against 3.7-4.8 us for bcc's items() (measured on the
    project's machines, shared/environment.md). Kernels before 5.6 have no batch lookup and
    old bcc lacks items_lookup_batch(); then the first failure switches to items() for good.
    """

    def __init__(self) -> None:
        self.batched: bool | None = None  # None until the first read tells

    def items(self, table: Any) -> list[tuple[Any, Any]]:
        if self.batched is not False:
            try:
                items = list(table.items_lookup_batch())
            except Exception as exc:  # bcc raises bare Exception; old bcc: AttributeError
                if self.batched:
                    raise  # batches worked before: this is a real failure, not a missing API
                self.batched = False
                log.info("batched map lookup unavailable (%s); reading entry by entry", exc)
            else:
                self.batched = True
                return items
        return list(table.items())

    @staticmethod
    def delete(table: Any, keys: Iterable[Any]) -> int:
        """Delete keys (already gone ones are fine: the kernel may have dropped them)."""
        n = 0
        for key in keys:
            # Batched reads hand back integer keys as plain ints; bcc deletes ctypes keys.
            with contextlib.suppress(KeyError):
                del table[table.Key(key) if isinstance(key, int) else key]
                n += 1
        return n


class RecordRingReader(Generic[R]):
    """Drains one BPF ring buffer through a decoder registry (records.decode_all);
    undecodable records are counted.

    The ring callback only copies each record's bytes out of the ring (a cached ctypes
    array type per size: half the cost of ctypes.string_at); decoding runs over the whole
    batch once the poll returns.
    """

    def __init__(
        self,
        bpf: Any,
        table_name: str,
        registry: Mapping[int, tuple[int, Callable[[bytes], R]]],
    ) -> None:
        self._bpf = bpf
        self._registry = registry
        self._raw: list[bytes] = []
        self._arrays: dict[int, Any] = {}  # record size -> c_char * size
        self.errors = DecodeErrors()
        table = bpf[table_name.encode()]
        table.open_ring_buffer(self._on_record)
        self.fd: int = table.map_fd

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        array = self._arrays.get(size)
        if array is None:
            array = ctypes.c_char * size
            if len(self._arrays) < MAX_RECORD_SIZES:
                self._arrays[size] = array
        self._raw.append(array.from_address(data).raw)
        return 0

    def poll(self, timeout_ms: int) -> list[R]:
        if timeout_ms:
            self._bpf.ring_buffer_poll(timeout_ms)  # returns early on a wake-up
        # Programs may send records without waking the reader (bpf/file.c batches its
        # wake-ups): take whatever waits, woken or not.
        self._bpf.ring_buffer_consume()
        raw, self._raw = self._raw, []
        return decode_all(self._registry, raw, self.errors) if raw else []
