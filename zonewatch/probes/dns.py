"""DNS questions as the net channel reads them from the bytes the kernel copied out of a
zone's query: the guest chose every one of them, so parsing is bounded by the buffer and
never trusts a length."""

from __future__ import annotations

from dataclasses import dataclass

DNS_HEADER_LEN = 12
DNS_NAME_MAX = 255  # wire bytes of a name, its final zero included (RFC 1035 2.3.4)
DNS_QTYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 13: "HINFO", 15: "MX",
    16: "TXT", 28: "AAAA", 33: "SRV", 35: "NAPTR", 43: "DS", 46: "RRSIG", 48: "DNSKEY",
    64: "SVCB", 65: "HTTPS", 99: "SPF", 251: "IXFR", 252: "AXFR", 255: "ANY", 257: "CAA",
}  # fmt: skip


def escape_label(label: bytes) -> str:
    """A DNS label as text: printable ASCII kept, `.` and `\\` escaped, any other byte as
    `\\DDD` (the master-file notation of RFC 1035 5.1, as dig prints it)."""
    out: list[str] = []
    for b in label:
        if b in (0x2E, 0x5C):
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


@dataclass(slots=True, frozen=True)
class DnsQuestion:
    """The first question of a DNS query. `error` says why parsing stopped ("" when it did
    not); `qname` then holds the labels read so far."""

    qname: str
    qtype: int
    error: str = ""

    @property
    def qtype_name(self) -> str:
        if self.error:
            return ""
        return DNS_QTYPES.get(self.qtype, f"TYPE{self.qtype}")  # RFC 3597 for the unknown


def parse_dns_query(msg: bytes) -> DnsQuestion:
    """The first question of a DNS message, read strictly within `msg`."""
    if len(msg) < DNS_HEADER_LEN:
        return DnsQuestion("", 0, "short header")
    if int.from_bytes(msg[4:6], "big") == 0:
        return DnsQuestion("", 0, "no question")
    labels: list[bytes] = []

    def name() -> str:
        return ".".join(escape_label(x) for x in labels) or "."

    pos = DNS_HEADER_LEN
    wire = 1  # the final zero
    while True:
        if pos >= len(msg):
            return DnsQuestion(name(), 0, "truncated")
        length = msg[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:
            # A pointer (or a reserved label type) has nothing to point back to in a
            # query's first name: refuse it rather than follow it.
            return DnsQuestion(name(), 0, "compressed or reserved label")
        wire += length + 1
        if wire > DNS_NAME_MAX:
            return DnsQuestion(name(), 0, "name longer than 255 bytes")
        if pos + length > len(msg):
            labels.append(msg[pos:])
            return DnsQuestion(name(), 0, "truncated")
        labels.append(msg[pos : pos + length])
        pos += length
    if pos + 4 > len(msg):
        return DnsQuestion(name(), 0, "truncated")
    return DnsQuestion(name(), int.from_bytes(msg[pos : pos + 2], "big"))
