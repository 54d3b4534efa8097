"""Bearer tokens from a file, each scoped to tenants or to all; a gRPC interceptor.

Tokens file (YAML; keep it 0600, the agent warns otherwise):

    version: 1
    tokens:
      - name: siem              # what logs and errors name; the token itself never
        sha256: "9f86d08..."    # hex SHA-256 of the token (or `token: "..."`, plain)
        tenants: ["*"]          # every tenant
      - name: acme-policy
        token: "s3cret-acme"
        tenants: [acme]

Every call needs `authorization: Bearer <token>`; a missing or unknown token is refused
with UNAUTHENTICATED. Health checking and reflection need no token (probes and tools).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from zonewatch.errors import ConfigError

log = logging.getLogger(__name__)

ALL = "*"
# Services any caller may use: liveness probes and schema discovery reveal no tenant data.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.", "/grpc.reflection.v1.")


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling: a token's name and the tenants it may see (None: all)."""

    name: str
    tenants: frozenset[str] | None

    def may_see(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    def scope(self, requested: Iterable[str]) -> frozenset[str] | None:
        """The tenants a request may see: its own list narrowed to the token's scope (None:
        all). Raises PermissionError when it asks for tenants the token does not cover."""
        wanted = frozenset(requested)
        if self.tenants is None:
            return wanted or None
        if not wanted:
            return self.tenants
        outside = wanted - self.tenants
        if outside:
            raise PermissionError(f"token {self.name!r} may not see tenant(s) {sorted(outside)}")
        return wanted


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenStore:
    def __init__(self, entries: Sequence[tuple[bytes, Principal]]) -> None:
        self._entries = list(entries)

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        path = Path(path)
        where = str(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("tokens file %s is readable by others (chmod 600 it)", path)
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(where, f"not YAML: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ConfigError(where, "expected a mapping with `version: 1`")
        items = doc.get("tokens")
        if not isinstance(items, list) or not items:
            raise ConfigError(where, "`tokens` must be a non-empty list")
        entries: list[tuple[bytes, Principal]] = []
        names: set[str] = set()
        for i, item in enumerate(items):
            at = f"{where}: tokens[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(at, "expected a mapping")
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise ConfigError(at, "`name` is required")
            if name in names:
                raise ConfigError(at, f"duplicate name {name!r}")
            names.add(name)
            if "sha256" in item:
                try:
                    digest = bytes.fromhex(str(item["sha256"]))
                except ValueError:
                    raise ConfigError(at, "`sha256` must be hex") from None
                if len(digest) != 32:
                    raise ConfigError(at, "`sha256` must be 64 hex digits")
            elif isinstance(item.get("token"), str) and len(item["token"]) >= 8:
                digest = _digest(item["token"])
            else:
                raise ConfigError(at, "needs `sha256` or a `token` of 8 characters or more")
            tenants = item.get("tenants")
            if not isinstance(tenants, list) or not tenants:
                raise ConfigError(at, '`tenants` must be a list (["*"] for all)')
            scope = None if ALL in tenants else frozenset(str(t) for t in tenants)
            entries.append((digest, Principal(name, scope)))
        return cls(entries)

    def authenticate(self, token: str) -> Principal | None:
        digest = _digest(token)
        found = None
        for known, principal in self._entries:
            # Constant time, and every entry compared: timing tells nothing about tokens.
            if hmac.compare_digest(known, digest):
                found = principal
        return found

    def from_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal | None:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token:
                    return self.authenticate(token.strip())
        return None


def _refuse(message: str) -> grpc.RpcMethodHandler:
    async def unary(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(unary), grpc.unary_stream_rpc_method_handler(stream)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a known bearer token before any handler runs."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens
        self.refused = 0
        self._unary, self._stream = _refuse("missing or unknown bearer token")

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(details)
        if self.tokens.from_metadata(details.invocation_metadata) is None:
            self.refused += 1
            log.info("refused %s: missing or unknown token", method)  # never the token
            handler = await continuation(details)
            if handler is not None and handler.response_streaming:
                return self._stream
            return self._unary
        return await continuation(details)


def token_from_env_or_file(value: str | None) -> str | None:
    """`--token` accepts the token, or @FILE to read it from a file; else $ZONEWATCH_TOKEN."""
    if value is None:
        return os.environ.get("ZONEWATCH_TOKEN")
    if value.startswith("@"):
        return Path(value[1:]).read_text().strip()
    return value
