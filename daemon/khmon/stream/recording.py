"""khmon recordings: a header describing the kernel, then the event stream, in framed parts.

Layout: MAGIC (10 bytes), then frames of `<kind:u8><length:u32><crc32:u32><payload>`.

  H  header, JSON: kernel release, the format files of every traced event (so records decode
     anywhere), BTF offsets used, THP/khugepaged settings and counters at start, options.
  R  records of one event: u16 event index, then fixed-size records (see layout.py).
  S  stats, JSON: khmon's probe counters (seen, lost, missed) and the kernel's THP
     counters at that moment; written every second, so a recording cut short still has them.
  E  end, JSON: the final stats, written once after the probes are detached and drained.
  P  pages, JSON: one PMD's PTEs as user space read them from /proc/PID/pagemap right after
     a scan event named the PMD (the `pagemap` bitmap source, on tracepoint-only kernels).

A file cut short (SIGKILL, full disk) reads up to its last complete frame with a warning; a
file that is not a recording, or whose checksums fail, is refused with a KhmonError.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import EXIT_BAD_INPUT, KhmonError
from .layout import EventLayout, layouts_from_header
from .parts import Part

MAGIC = b"\x89KHMON\r\n\x1a\n"  # like PNG's: binary, and detects newline mangling
VERSION = 1
FRAME = struct.Struct("<BII")
EVENT_INDEX = struct.Struct("<H")
HEADER, RECORDS, STATS, END, PAGES = b"H", b"R", b"S", b"E", b"P"
KINDS = {HEADER[0], RECORDS[0], STATS[0], END[0], PAGES[0]}


class Writer:
    """Appends frames to a recording; each frame hits the file as one write."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        try:
            self._f: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        except OSError as e:
            raise KhmonError(f"cannot create {path}: {e.strerror}", "choose a writable path") from e
        self.bytes_written = 0
        self._write(MAGIC + struct.pack("<H", VERSION))
        self.frame(HEADER, json.dumps({"version": VERSION, **header}).encode())

    def _write(self, data: bytes) -> None:
        try:
            self._f.write(data)
            self._f.flush()
        except OSError as e:
            raise KhmonError(
                f"cannot write {self.path}: {e.strerror}; everything before byte "
                f"{self.bytes_written} is kept and readable",
                "free disk space and record again") from e
        self.bytes_written += len(data)

    def frame(self, kind: bytes, payload: bytes) -> None:
        self._write(FRAME.pack(kind[0], len(payload), zlib.crc32(payload)) + payload)

    def add(self, part: Part) -> None:
        """Append one part of an event stream (records, stats, pages or end)."""
        if part.kind == "R":
            if part.data:
                self.frame(RECORDS, EVENT_INDEX.pack(part.event) + part.data)
        elif part.kind in ("S", "E", "P"):
            self.frame(part.kind.encode(), json.dumps(part.meta).encode())
        else:
            raise ValueError(f"a writer takes record, stats, pages and end parts, not {part.kind!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


def _check_header(h: dict) -> list[EventLayout]:
    """The layouts a header describes; raises on anything a report would trip over later."""
    if not isinstance(h["kernel"]["release"], str) or not isinstance(h["start_mono_ns"], int):
        raise TypeError("kernel.release or start_mono_ns has the wrong type")
    return layouts_from_header(h["events"])


def _bad(path: Path, what: str) -> KhmonError:
    return KhmonError(f"{path}: {what}", "khmon reads files written by: khmon record -o FILE",
                      EXIT_BAD_INPUT)


class Reader:
    """Iterates the parts of a recording; `warnings` says what a cut-short file lost."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                # Mapped, not read: a replay touches each part once, and the page cache
                # rather than the process holds a large recording.
                self._data: bytes | mmap.mmap = (
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    if os.fstat(f.fileno()).st_size else b"")
        except OSError as e:
            raise KhmonError(f"cannot read {path}: {e.strerror}", "check the path",
                             EXIT_BAD_INPUT) from e
        self.warnings: list[str] = []
        self.complete = False
        self.layouts: list[EventLayout] = []
        head = len(MAGIC) + 2
        if not self._data:
            raise _bad(path, "empty file, not a khmon recording")
        if self._data[: len(MAGIC)] != MAGIC[: len(self._data)]:
            raise _bad(path, "not a khmon recording (bad magic)")
        if len(self._data) < head:
            raise _bad(path, f"truncated recording: {len(self._data)} bytes, header incomplete")
        (version,) = struct.unpack_from("<H", self._data, len(MAGIC))
        if version != VERSION:
            raise _bad(path, f"recording format version {version}; this khmon reads {VERSION}")
        self._pos = head
        first = self._next()
        if first is None or first.kind != "H":
            raise _bad(path, "truncated recording: header incomplete")
        self.header = first.meta
        try:
            self.layouts = _check_header(self.header)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise _bad(path, f"header is not a khmon header ({type(e).__name__}: {e})") from e

    def _next(self) -> Part | None:
        data, pos = self._data, self._pos
        if pos == len(data):
            return None
        if pos + FRAME.size > len(data):
            self._truncated(pos)
            return None
        kind, length, crc = FRAME.unpack_from(data, pos)
        if kind not in KINDS:
            raise _bad(self.path, f"corrupt recording at byte {pos} (unknown part {kind:#x})")
        start, end = pos + FRAME.size, pos + FRAME.size + length
        if end > len(data):
            self._truncated(pos)
            return None
        with memoryview(data) as view:
            if zlib.crc32(view[start:end]) != crc:
                raise _bad(self.path, f"corrupt recording at byte {pos} (checksum mismatch)")
        self._pos = end
        k = chr(kind)
        if k == "R":
            if length < EVENT_INDEX.size:
                raise _bad(self.path, f"corrupt recording at byte {pos} (empty record part)")
            (event,) = EVENT_INDEX.unpack_from(data, start)
            records = data[start + EVENT_INDEX.size:end]
            if event >= len(self.layouts) or len(records) % self.layouts[event].size:
                raise _bad(self.path, f"corrupt recording at byte {pos} (records of event "
                           f"{event} do not fit its layout)")
            return Part(k, event=event, data=records)
        try:
            meta = json.loads(data[start:end])
        except ValueError as e:
            raise _bad(self.path, f"corrupt recording at byte {pos} (bad JSON)") from e
        if k == "E":
            self.complete = True
        return Part(k, meta=meta)

    def _truncated(self, pos: int) -> None:
        lost = len(self._data) - pos
        self.warnings.append(
            f"recording cut short: the last {lost} bytes (an incomplete part) were lost; "
            f"counts cover the events up to the last complete part")

    def parts(self) -> Iterator[Part]:
        """The parts after the header, in order."""
        while (part := self._next()) is not None:
            yield part
        if not self.complete and not any("cut short" in w for w in self.warnings):
            self.warnings.append("recording has no end part (the recorder was killed); "
                                 "counts cover the events up to the last complete part")
