"""Text for the terminal: user strings (suite, model and method names, messages, paths) shown inert.

A name or an error message may hold ANSI escapes, carriage returns, newlines or bidi overrides;
printed raw they recolour or clear the terminal, rewrite a line, or split one line in two.
``printable`` writes each such character as its Python escape. Rich markup is a second channel:
print user strings as ``rich.text.Text`` (or through ``rich.markup.escape``), never as markup.
"""

from __future__ import annotations

import unicodedata

# Cc: C0, DEL and C1 controls (ESC, CR, LF, BEL, CSI...); Cf: format controls (bidi overrides,
# zero-width marks); Zl/Zp: the line and paragraph separators; Cs/Co/Cn: no glyph to show.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(char: str) -> str:
    code = ord(char)
    if char in "\n\r\t":
        return repr(char)[1:-1]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object) -> str:
    """``str(text)`` with every control or invisible character written as its escape (``\\x1b``,
    ``\\n``, ``\\u202e``): the result prints as one line and cannot drive the terminal."""
    text = str(text)
    if text.isprintable():  # the common case; str.isprintable is False for all of the above
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _HIDDEN_CATEGORIES else c for c in text)
