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

The file is checked node by node (zonewatch.yamlfile): unknown or duplicate keys, wrong
types, two entries with the same secret (one would silently shadow the other's scope),
a tenant that is not a tenant name are errors `ConfigError("PATH:LINE:COL", message)`,
never ignored; no message or log line ever shows a secret.

Every call needs `authorization: Bearer <token>`; a missing or unknown token is refused
with UNAUTHENTICATED. Health checking and reflection need no token (probes and tools).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from yaml.nodes import Node, ScalarNode

from zonewatch.inventory.tenants import TENANT_NAME_PATTERN
from zonewatch.yamlfile import STR, NodeChecker, compose, is_map, is_seq, show

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


MIN_TOKEN_CHARS = 8
# What a bearer token may hold (RFC 6750 b64token): it travels in an HTTP/2 header.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_TOKEN_NAME = re.compile(r"[A-Za-z0-9._@:-]{1,63}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


class _TokensChecker(NodeChecker):
    def tokens(self, root: Node | None) -> list[tuple[bytes, Principal]]:
        items = self.versioned_list(root, "tokens", "tokens file", "token entries")
        if not items.value:
            raise self.error(items, "'tokens' must be a non-empty list of token entries")
        names: dict[str, Node] = {}
        secrets: dict[bytes, tuple[str, Node]] = {}
        return [self.entry(item, names, secrets) for item in items.value]

    def entry(
        self, node: Node, names: dict[str, Node], secrets: dict[bytes, tuple[str, Node]]
    ) -> tuple[bytes, Principal]:
        if not is_map(node):
            raise self.error(node, "a token entry is a mapping with 'name', 'token' or "
                             "'sha256', and 'tenants'")  # fmt: skip
        fields = self.keys(node, ("name", "token", "sha256", "tenants"), "token entry")
        if "name" not in fields:
            raise self.error(node, "token entry is missing 'name'")
        name_node = fields["name"][1]
        name = self.string(name_node, "token name")
        if not _TOKEN_NAME.fullmatch(name):
            raise self.error(
                name_node, f"invalid token name {show(name)}: 1-63 of A-Z a-z 0-9 . _ @ : -"
            )
        if name in names:
            first = names[name].start_mark.line + 1
            raise self.error(
                name_node, f"duplicate token name {show(name)} (first at line {first})"
            )
        names[name] = name_node
        digest, secret_node = self.secret(node, fields, name)
        if digest in secrets:
            other, other_node = secrets[digest]
            raise self.error(
                secret_node,
                f"token {show(name)} has the same secret as token {show(other)} (line "
                f"{other_node.start_mark.line + 1}): each secret must be unique, or one "
                "entry's scope would silently replace the other's",
            )
        secrets[digest] = (name, secret_node)
        if "tenants" not in fields:
            raise self.error(node, f"token {show(name)} is missing 'tenants' ([\"*\"] for all)")
        return digest, Principal(name, self.scope(fields["tenants"][1], name))

    def secret(
        self, node: Node, fields: dict[str, tuple[ScalarNode, Node]], name: str
    ) -> tuple[bytes, Node]:
        """The secret's digest and node. Messages never show the secret's value."""
        if ("token" in fields) == ("sha256" in fields):
            raise self.error(node, f"token {show(name)} needs exactly one of 'token' and 'sha256'")
        if "sha256" in fields:
            value = fields["sha256"][1]
            if not (isinstance(value, ScalarNode) and value.tag == STR):
                raise self.error(value, "'sha256' must be a quoted string of 64 hex digits")
            if not _HEX64.fullmatch(value.value):
                raise self.error(value, "'sha256' must be 64 hex digits (a SHA-256 digest)")
            return bytes.fromhex(value.value), value
        value = fields["token"][1]
        if not (isinstance(value, ScalarNode) and value.tag == STR):
            raise self.error(value, "'token' must be a string (quote it)")
        if len(value.value) < MIN_TOKEN_CHARS:
            raise self.error(value, f"'token' must be {MIN_TOKEN_CHARS} characters or more")
        if not _TOKEN_CHARS.fullmatch(value.value):
            raise self.error(value, "'token' may hold only A-Z a-z 0-9 - . _ ~ + / (then =)")
        return _digest(value.value), value

    def scope(self, node: Node, name: str) -> frozenset[str] | None:
        if not is_seq(node) or not node.value:
            raise self.error(node, f"token {show(name)}: 'tenants' must be a non-empty list "
                             '(["*"] for all)')  # fmt: skip
        tenants: dict[str, Node] = {}
        for item in node.value:
            if not (isinstance(item, ScalarNode) and item.tag == STR):
                shown = show(item.value) if isinstance(item, ScalarNode) else "a collection"
                raise self.error(item, f"a tenant must be a string, not {shown} (quote it)")
            tenant = item.value
            if tenant != ALL and not TENANT_NAME_PATTERN.fullmatch(tenant):
                raise self.error(
                    item, f"invalid tenant name {show(tenant)}: 1-63 of A-Z a-z 0-9 . _ -"
                )
            if tenant in tenants:
                raise self.error(item, f"tenant {show(tenant)} listed twice")
            tenants[tenant] = item
        if ALL in tenants:
            if len(tenants) > 1:
                raise self.error(
                    tenants[ALL], f"'{ALL}' means every tenant: list it alone, or name tenants"
                )
            return None
        return frozenset(tenants)


class TokenStore:
    def __init__(self, entries: Sequence[tuple[bytes, Principal]]) -> None:
        self._entries = list(entries)

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        """Read and check a tokens file; ConfigError("PATH:LINE:COL", message) if malformed."""
        where = str(path)
        with contextlib.suppress(OSError, ValueError):  # compose() says why it can't read
            if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("tokens file %s is readable by others (chmod 600 it)", path)
        return cls(_TokensChecker(where).tokens(compose(where, path, "tokens file")))

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
