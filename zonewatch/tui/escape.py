"""The one way a terminal shows a string a guest chose (zone names, file names, DNS names,
comms, alert summaries and evidence that quote them): the TUI, `zonewatch tail`, the
`zones` and `audit` tables and `rules test` all print guest text through escape().

Valid UTF-8 can still hold ESC, CR, LF, backspace, bidi overrides or line separators:
printed as is they retitle or clear the terminal, forge lines or reorder the layout. Here
every such code point becomes a visible escape, and the result is bounded:

- `\\x00`-`\\x1f`, `\\x7f`: ASCII controls (`\\n`, `\\r`, `\\t` for the usual three);
- `\\u0080`-`\\u009f`, `\\u202e`, `\\u2066`, ...: C1 controls, bidi controls, other format
  and invisible characters, separators other than the space;
- `\\xNN` for a code point U+DC80-U+DCFF: an invalid UTF-8 byte NN, as Python decodes
  argv and paths (surrogateescape);
- `\\\\` for a backslash, so that text a guest typed (`\\x1b`, shown `\\\\x1b`) never looks
  like an escape made here (`\\x1b`).

An ASCII escape (`\\xNN` with NN < 80) is the byte itself; `\\xNN` with NN >= 80 is only ever
an invalid byte: a valid character U+0080-U+00FF is shown as itself or as `\\u00NN`.
"""

from __future__ import annotations

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# Printable by str.isprintable() yet invisible on a terminal (Unicode's default-ignorable
# letters and marks): Hangul fillers, the combining grapheme joiner, Khmer inherent vowels,
# Mongolian and other variation selectors. A name made of them looks empty or like another.
_INVISIBLE = frozenset(
    (0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0,
     *range(0x180B, 0x1810), *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0))
)  # fmt: skip
DEFAULT_LIMIT = 120
_cache: dict[str, str] = {}


def _visible(ch: str) -> bool:
    return ch.isprintable() and ch != "\\" and ord(ch) not in _INVISIBLE


def _escape_char(ch: str) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the invalid byte itself
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(value: str, limit: int = DEFAULT_LIMIT) -> str:
    """`value` with every control, format, invisible or non-printable code point and every
    backslash as an escape (see the module), cut to at most `limit` characters (the last
    one an ellipsis when cut). Spaces stay; so does printable non-ASCII text (the terminal
    measures its width)."""
    key = value if limit == DEFAULT_LIMIT and len(value) <= 256 else ""
    if key and key in _cache:
        return _cache[key]
    # The common case (nothing to escape) is one C-level scan.
    if value.isprintable() and "\\" not in value and not _INVISIBLE.intersection(map(ord, value)):
        out = value
    else:
        out = "".join(ch if _visible(ch) else _escape_char(ch) for ch in value)
    if len(out) > limit:
        out = out[: max(limit - 1, 0)] + "…"
    if key:
        if len(_cache) > 50_000:  # bounded: a guest can invent names forever
            _cache.clear()
        _cache[key] = out
    return out


__all__ = ["DEFAULT_LIMIT", "escape"]
