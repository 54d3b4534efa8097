"""The one way the UI shows a string a guest chose (file names, DNS names, comms, alert
summaries that quote them).

zonewatch.pipeline.text() already turns the kernel's bytes into a str with invalid UTF-8
escaped (`\\xNN`), but valid UTF-8 can still hold ESC, CR, backspace, bidi overrides or
line separators: printed as is they move the cursor, clear the screen or reorder the
layout. Here every such code point becomes a visible escape, and the result is bounded.
"""

from __future__ import annotations

# str.isprintable() is False exactly for what must not reach the terminal raw: controls
# (C0, DEL, C1: ESC, CR, BS...), format characters (bidi overrides, zero-width joiners),
# separators other than the ASCII space (line/paragraph separators, NBSP), surrogates,
# private-use and unassigned code points.
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
DEFAULT_LIMIT = 120
_cache: dict[str, str] = {}


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if ch in _SHORT:
        return _SHORT[ch]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(value: str, limit: int = DEFAULT_LIMIT) -> str:
    """`value` with every non-printable code point as a \\x1b-style escape, cut to at most
    `limit` characters (the last one an ellipsis when cut). Spaces stay; so does printable
    non-ASCII text (the terminal measures its width)."""
    key = value if limit == DEFAULT_LIMIT and len(value) <= 256 else ""
    if key and key in _cache:
        return _cache[key]
    if value.isprintable():  # the common case: nothing to escape
        out = value
    else:
        out = "".join(ch if ch.isprintable() else _escape_char(ch) for ch in value)
    if len(out) > limit:
        out = out[: max(limit - 1, 0)] + "…"
    if key:
        if len(_cache) > 50_000:  # bounded: a guest can invent names forever
            _cache.clear()
        _cache[key] = out
    return out


__all__ = ["DEFAULT_LIMIT", "escape"]
