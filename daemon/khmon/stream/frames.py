"""The framing of a recording, and how a damaged length is told apart from a cut.

A recording is MAGIC, a u16 version, then frames `<kind:u8><length:u32><crc32:u32><payload>`
(recording.py says what each kind holds). A frame whose length runs past the end of the
file is either the last part of a file cut short (SIGKILL between two writes leaves whole
frames; a full disk or a partial copy leaves part of one) or a length field damaged in the
middle of an intact file, which would otherwise silently drop everything after it. The rest
of the file tells them apart: after a damaged length the payload is whole (its checksum
matches the bytes up to the end of the file) or a valid frame follows (a known kind, a
length that fits, a payload of the right form and a checksum that matches: about one chance
in 2^32 of appearing by accident in what a cut left), and after a real cut neither is true.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"\x89KHMON\r\n\x1a\n"  # like PNG's: binary, and detects newline mangling
VERSION = 1
SIGNATURE = len(MAGIC) + 2  # MAGIC, then the u16 version
FRAME = struct.Struct("<BII")
EVENT_INDEX = struct.Struct("<H")
HEADER, RECORDS, STATS, END, PAGES = b"H", b"R", b"S", b"E", b"P"
KINDS = {HEADER[0], RECORDS[0], STATS[0], END[0], PAGES[0]}
JSON_KINDS = {HEADER[0], STATS[0], END[0], PAGES[0]}  # json.dumps of an object: {...}
NAMES = {HEADER[0]: "header", RECORDS[0]: "records", STATS[0]: "stats", END[0]: "end",
         PAGES[0]: "pages"}
CHUNK = 1 << 20
_KIND_BYTE = re.compile(b"[" + re.escape(bytes(sorted(KINDS))) + b"]")


@dataclass
class Span:
    """Bytes [start, end) of the input: read back from a regular file (pread, so a large
    file is never held in memory), or held in `buf` when the input was a stream."""

    start: int
    end: int
    fd: int | None = None
    buf: bytes = b""

    def get(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.end - offset))
        if self.fd is None:
            return self.buf[offset - self.start:offset - self.start + n]
        return os.pread(self.fd, n, offset)

    def chunks(self, offset: int, overlap: int = 0) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) from `offset` to the end, each chunk also holding the first
        `overlap` bytes of the next."""
        while offset < self.end:
            yield offset, self.get(offset, CHUNK + overlap)
            offset += CHUNK

    def crc(self, offset: int) -> int:
        value = 0
        for _, chunk in self.chunks(offset):
            value = zlib.crc32(chunk, value)
        return value


def _valid_at(span: Span, at: int, head: bytes, record_sizes: list[int]) -> bool:
    """Is there a whole frame at `at` that khmon could have written?"""
    kind, length, crc = FRAME.unpack(head)
    start, end = at + FRAME.size, at + FRAME.size + length
    if kind not in KINDS or not length or end > span.end:
        return False
    if kind in JSON_KINDS:  # cheap tests first: a checksum of a long payload is not
        if span.get(start, 1) != b"{" or span.get(end - 1, 1) != b"}":
            return False
    else:
        if length < EVENT_INDEX.size:
            return False
        if record_sizes:
            (event,) = EVENT_INDEX.unpack(span.get(start, EVENT_INDEX.size))
            if event >= len(record_sizes) or (length - EVENT_INDEX.size) % record_sizes[event]:
                return False
    value = 0
    for pos in range(start, end, CHUNK):
        value = zlib.crc32(span.get(pos, min(CHUNK, end - pos)), value)
    return value == crc


def valid_frame_after(span: Span, record_sizes: list[int]) -> int | None:
    """The offset of the first valid frame in the span (record_sizes: the recording's
    record size per event, or [] before the header is known)."""
    for offset, chunk in span.chunks(span.start, FRAME.size - 1):
        for m in _KIND_BYTE.finditer(chunk, 0, CHUNK):
            at = offset + m.start()
            head = chunk[m.start():m.start() + FRAME.size]
            if len(head) == FRAME.size and _valid_at(span, at, head, record_sizes):
                return at
    return None
