"""Names in messages: a file name, shard key or path shown to a user is always one printable line.

Names come from input listings, object-store keys, partitions added in the UI and the command
line; a newline or an escape sequence in one must not split an error over two lines or drive
the terminal. `printable` is the one place that makes a name safe to put into a message.
"""

from __future__ import annotations

import os
import re

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators (they break lines too).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def printable(name: str | os.PathLike[str] | object) -> str:
    """`name` as text with every control character escaped (`bad\\nname`: a backslash and an n), else unchanged."""
    text = os.fspath(name) if isinstance(name, os.PathLike) else str(name)
    if isinstance(text, bytes):
        text = text.decode(errors="backslashreplace")
    return _UNPRINTABLE.sub(_escape, text)
