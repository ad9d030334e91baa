"""Text that is safe to show on a terminal: the one escaping helper of every text output.

Any process can rename itself (prctl(PR_SET_NAME), /proc/PID/comm), and a recording is a
file anyone can write, so process names, status names, file names and kernel strings may
hold escape sequences that would repaint or retitle the terminal. Everything khmon prints
as text passes through printable() on its way out (outputs.streams), so no field can forget.

The convention is the kernel's `%pE` with ESCAPE_HEX and `ps`'s: each non-printable
character becomes `\\xNN` (C0 and C1 controls, DEL, and the other characters Python's
str.isprintable() rejects; `\\uNNNN` / `\\UNNNNNNNN` above U+00FF), and a backslash becomes
`\\\\`, as /proc/PID/status escapes it, so an escaped name is never ambiguous. Printable
text, UTF-8 included, is kept as it is.

Invalid UTF-8 is not turned into `\\xNN`: a comm is decoded once, in the model, with
errors="replace", and the same decoded string feeds the JSON output, which must be valid
Unicode. Such bytes show as U+FFFD in text and JSON alike. JSON output is not passed through
here: json.dumps escapes every control and non-ASCII character itself (`\\u001b`).
"""

from __future__ import annotations


def _escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch.isprintable():
        return ch
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(text: str) -> str:
    """`text` with every non-printable character (and the backslash) escaped."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escape, text))
