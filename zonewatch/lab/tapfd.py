"""A tap driven the way a VMM drives one: frames written to and read from its fd.

    with TapFd("zwnt0") as tap:            # a tap that lives as long as the fd
        tap.configure("10.214.0.1", 30, guest_ip="10.214.0.2")
        tap.write(ipv4_frame(...))         # what a guest would send
        frame = tap.read(timeout=1.0)      # what the host sent the guest

Frame builders make well-formed Ethernet/IPv4/IPv6 frames with TCP, UDP, ICMP and DNS
payloads; tests cut and bend them into the hostile ones. Nothing here routes anywhere:
the addresses are the ones the caller gives the tap.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
from types import TracebackType

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
GUEST_MAC = bytes.fromhex("5254005a57fe")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, frag_off: int = 0) -> bytes:
    """An IPv4 datagram (20-byte header, checksum set); frag_off is the raw 16-bit field."""
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, frag_off, 64, proto, 0,
        _ip4(src), _ip4(dst),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    if not frag_off:
        pseudo = _ip4(src) + _ip4(dst) + struct.pack("!BBH", 0, proto, len(payload))
        payload = _with_l4_checksum(proto, pseudo, payload)
    return header + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    import ipaddress

    addrs = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    pseudo = addrs + struct.pack("!I3xB", len(payload), next_header)
    payload = _with_l4_checksum(next_header, pseudo, payload)
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + addrs + payload


def _with_l4_checksum(proto: int, pseudo: bytes, segment: bytes) -> bytes:
    """TCP/UDP segments get their checksum (so the host stack answers them); others and
    segments too short to hold one are left as they are."""
    at = {6: 16, 17: 6}.get(proto)
    if at is None or len(segment) < at + 2:
        return segment
    blank = segment[:at] + b"\0\0" + segment[at + 2 :]
    return segment[:at] + struct.pack("!H", checksum(pseudo + blank) or 0xFFFF) + segment[at + 2 :]


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"", seq: int = 1) -> bytes:
    """A TCP segment with a 20-byte header; flags as in the header's flag byte."""
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload


def icmp_echo(ident: int, seq: int, payload: bytes = b"", *, v6: bool = False) -> bytes:
    kind = 128 if v6 else 8
    body = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def dns_query(name: bytes | list[bytes], qtype: int = 1, ident: int = 0x2A57) -> bytes:
    """A DNS query for `name` (dotted, or the raw labels, which may be anything)."""
    labels = name if isinstance(name, list) else [x for x in name.split(b".") if x]
    qname = b"".join(bytes([len(x)]) + x for x in labels) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def _ip4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


class TapFd:
    """A tap that exists while this object's fd is open (not persistent)."""

    def __init__(self, name: str) -> None:
        if len(name) > 15:
            raise ValueError(f"tap name {name!r} is longer than 15 characters")
        self.name = name
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError:
            os.close(self.fd)
            raise
        self.host_mac = bytes(6)
        self.index = 0

    def configure(self, host_ip: str, prefixlen: int, guest_ip: str | None = None) -> None:
        """Give the tap `host_ip/prefixlen`, bring it up, and (for `guest_ip`) a permanent
        neighbour entry so the host sends to the "guest" without asking ARP first. IPv6 is
        off on it, so the host sends no solicitations of its own into the counts."""
        from pyroute2 import IPRoute

        with open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as f:
            f.write("1")

        with IPRoute() as ipr:
            self.index = int(ipr.link_lookup(ifname=self.name)[0])
            ipr.link("set", index=self.index, state="up")
            ipr.addr("add", index=self.index, address=host_ip, prefixlen=prefixlen)
            link = ipr.get_links(self.index)[0]
            self.host_mac = bytes.fromhex(str(link.get_attr("IFLA_ADDRESS")).replace(":", ""))
            if guest_ip is not None:
                ipr.neigh(
                    "add", dst=guest_ip, lladdr=":".join(f"{b:02x}" for b in GUEST_MAC),
                    ifindex=self.index, state=0x80,  # NUD_PERMANENT
                )  # fmt: skip

    def frame(self, ethertype: int, payload: bytes) -> bytes:
        """An Ethernet frame from the guest to the host."""
        return ether(self.host_mac, GUEST_MAC, ethertype, payload)

    def write(self, frame: bytes) -> int:
        return os.write(self.fd, frame)

    def read(self, timeout: float) -> bytes | None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TapFd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
