"""Where khmon's text goes: results to stdout, progress, warnings and errors to stderr.

stdout carries what a command was asked for (a report, a simulation, doctor's table). When
its reader goes away (`khmon report F | head -1`), khmon ends at once and quietly with
status 141, 128 + SIGPIPE: what the shell shows when SIGPIPE ends `yes | head`, so scripts
and `set -o pipefail` see what they see from any Unix filter. khmon does not get there by
restoring SIGPIPE's default disposition (Python ignores SIGPIPE and raises BrokenPipeError
instead): that would also let a closed stderr kill a capture in the middle of its window,
before it detached, drained and wrote its end part. Any other write error on stdout (ENOSPC
on /dev/full, EIO from a hung-up terminal) is one error line and exit 1.

stderr carries lines about the work, never the work itself, so writing to it never raises:
a closed pipe, a full disk or a vanished terminal there must not end a capture. After the
first failure stderr is silenced for good.

Both escape what they print (outputs.escape.printable); JSON is escaped by json.dumps.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
from typing import Any, NoReturn, TextIO

from ..errors import KhmonError
from .escape import printable

EXIT_EPIPE = 128 + signal.SIGPIPE


def _silence(stream: TextIO | None) -> None:
    """Point the stream's descriptor at /dev/null, so that what is left in its buffer, and
    the interpreter's flush at exit, go nowhere instead of failing again (which Python
    reports as "Exception ignored ..." and exit status 120)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


# What a failed write to stdout says; any other errno is not an output problem.
OUTPUT_ERRNOS = frozenset({errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EBADF, errno.EDQUOT,
                           errno.EFBIG})


def stdout_failed(e: OSError) -> NoReturn:
    """The answer to a failed write on stdout: quiet exit 141 for EPIPE, else one line."""
    _silence(sys.stdout)
    if isinstance(e, BrokenPipeError):
        raise SystemExit(EXIT_EPIPE) from None
    fix = {errno.EBADF: "khmon was started with it closed: give it one, e.g. >FILE",
           errno.EIO: "its terminal or device is gone: send it to a file"}.get(
        e.errno, "free space where it goes, or send it elsewhere")
    raise KhmonError(f"cannot write to standard output: {e.strerror}", fix) from None


def _stdout(text: str) -> None:
    try:
        if sys.stdout is None:  # started with fd 1 closed (>&-)
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        stdout_failed(e)


def out(text: str) -> None:
    """Text for people on stdout, each line escaped, with a final newline."""
    _stdout("\n".join(printable(line) for line in text.split("\n")) + "\n")


def out_json(doc: Any) -> None:
    """A JSON document on stdout (json.dumps escapes control and non-ASCII characters)."""
    _stdout(json.dumps(doc, indent=2) + "\n")


class _Stderr:
    """stderr that never raises; silent after its first failure."""

    def __init__(self) -> None:
        self.broken = False

    def say(self, line: str) -> None:
        if self.broken:
            return
        try:
            sys.stderr.write(printable(line) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # closed, full, gone, or None (2>&-)
            self.broken = True
            _silence(sys.stderr)


say = _Stderr().say
