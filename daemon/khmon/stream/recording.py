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

Framing and the tell between a cut and a damaged length are in frames.py, the shape of each
JSON part in shapes.py. A file cut short (SIGKILL, full disk) reads up to its last complete
frame with a warning that says what the cut cost; a file that is not a recording, whose
checksums fail, whose length fields are damaged or whose parts have the wrong shape is
refused with a KhmonError naming the byte. Files are read with ordinary reads, never
mapped (a file truncated under a mapping kills its reader with SIGBUS), so a pipe, a FIFO or
`<(...)` reads like a file; `-` is standard input.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import EXIT_BAD_INPUT, KhmonError
from ..geometry import PMD_ORDER
from . import shapes
from .frames import (
    CHUNK,
    EVENT_INDEX,
    FRAME,
    HEADER,
    KINDS,
    MAGIC,
    NAMES,
    RECORDS,
    SIGNATURE,
    VERSION,
    Span,
    valid_frame_after,
)
from .layout import EventLayout
from .liveness import running_recorder
from .parts import Part

STDIO = "-"  # as FILE: standard input for a Reader, standard output for a Writer


def _create(path: Path) -> BinaryIO:
    """Open `path` for a new recording. A regular file there is replaced (unlinked, then
    created anew), never truncated in place: a `khmon report` still reading the old file
    keeps reading it whole. A device, a FIFO or a symlink is opened as it is; `-` is
    standard output."""
    if str(path) == STDIO:
        return os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        return open(path, "wb")
    if st is not None:
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def check_output(path: Path, replace: bool) -> None:
    """Refuse an -o path before a capture compiles (seconds on the host, a minute in a TCG
    guest), rather than after: a directory, a missing or read-only directory, and (unless
    `replace`, --force) an existing regular file, which would be lost. Devices and FIFOs
    (/dev/null, a pipe to another program) are written as streams."""
    def bad(problem: str, fix: str) -> KhmonError:
        return KhmonError(f"-o {path}: {problem}", fix, EXIT_BAD_INPUT)

    if str(path) == STDIO:
        if sys.stdout is None or sys.stdout.isatty():
            raise bad("standard output is " + ("closed" if sys.stdout is None else
                                               "a terminal, not a place for binary data"),
                      "send it on: -o - > FILE, or -o - | khmon report -")
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise bad(e.strerror, "choose another path") from e
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise bad("is a directory", "give a file name, e.g. -o DIR/run.khrec")
    if st is not None and not stat.S_ISREG(st.st_mode):
        if not os.access(path, os.W_OK, effective_ids=True):
            raise bad("not writable", "choose another path")
        return
    if st is not None and not replace:
        raise bad(f"exists ({st.st_size} bytes)", "use --force to replace it, or another name")
    parent = path.parent
    try:  # the one sure test of "can a file be created here": create one
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".khmon-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise bad(f"cannot create a file in {parent}: {e.strerror}",
                  "choose a writable directory") from e


class Writer:
    """Appends frames to a recording; each frame hits the file as one write, so a recorder
    killed between two writes leaves a file that reads up to its last part."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.name = "standard output" if str(path) == STDIO else str(path)
        self.bytes_written = 0
        self._header_written = False
        try:
            self._f: BinaryIO = _create(path)
            self._regular = stat.S_ISREG(os.fstat(self._f.fileno()).st_mode)
        except OSError as e:
            raise KhmonError(f"cannot create {self.name}: {e.strerror}",
                             "choose a writable path") from e
        self._write(MAGIC + struct.pack("<H", VERSION))
        self.frame(HEADER, json.dumps({"version": VERSION, **header}).encode())
        self._header_written = True

    def _write(self, data: bytes) -> None:
        try:
            self._f.write(data)
            self._f.flush()
        except OSError as e:
            if not self._header_written:
                kept = "nothing readable was written"
            elif self._regular:
                kept = f"its first {self.bytes_written} bytes read as a recording cut short"
            else:
                kept = f"{self.bytes_written} bytes went out before it"
            raise KhmonError(f"cannot write {self.name}: {e.strerror}; {kept}",
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


def _bad(path: Path | str, what: str) -> KhmonError:
    return KhmonError(f"{path}: {what}", "khmon reads files written by: khmon record -o FILE",
                      EXIT_BAD_INPUT)


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _open(path: Path) -> BinaryIO:
    if str(path) == STDIO:
        return sys.stdin.buffer
    try:
        # Unbuffered: parts are read whole, one read each, and a buffer would hide a file
        # truncated under the reader behind bytes read ahead of it.
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise KhmonError(f"cannot read {path}: {e.strerror}", "check the path",
                         EXIT_BAD_INPUT) from e


class Reader:
    """Iterates the parts of a recording; `warnings` says what a cut-short file lost.

    Reads in order with ordinary reads, from a regular file or any stream. Where a part's
    length runs past the end of the input, the rest of it says whether that is the cut of a
    file cut short (a warning) or a damaged length (refused: frames.py)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = "standard input" if str(path) == STDIO else str(path)
        self.warnings: list[str] = []
        self.complete = False
        self.layouts: list[EventLayout] = []
        self._f = _open(path)
        try:
            self.regular = stat.S_ISREG(os.fstat(self._f.fileno()).st_mode)
        except (OSError, ValueError):
            self.regular = False
        self._pos = 0  # bytes of the input consumed
        self._last_stats: dict | None = None
        self._last_record_ns: int | None = None
        head = self._read(SIGNATURE)
        if not head:
            raise self._bad("empty file, not a khmon recording" if self.regular
                            else "empty input: nothing came through it")
        if head[:len(MAGIC)] != MAGIC[:len(head)]:
            raise self._bad("not a khmon recording (bad magic)")
        if len(head) < SIGNATURE:
            raise self._bad(f"recording cut short inside its {SIGNATURE}-byte signature "
                            f"({len(head)} bytes): nothing to report")
        (version,) = struct.unpack_from("<H", head, len(MAGIC))
        if version != VERSION:
            raise self._bad(f"recording format version {version}; this khmon reads {VERSION}")
        first = self._next()
        if first is None:
            raise self._bad("recording cut short inside its header: nothing to report")
        self.header = first.meta
        if isinstance(self.header, dict) and self.header.get("version", VERSION) != VERSION:
            raise self._bad(f"recording header version {self.header['version']!r}; this "
                            f"khmon reads version {VERSION}")
        try:
            self.layouts = shapes.header_layouts(self.header)
        except shapes.ShapeError as e:
            raise self._bad(f"header is not a khmon header: {e}") from e
        self._orders = [lay.projection(("order",)) if "order" in lay.field_names else None
                        for lay in self.layouts]

    def _bad(self, what: str) -> KhmonError:
        return _bad(self.name, what)

    def _read(self, n: int) -> bytes:
        """Up to n bytes (fewer only at the end of the input), read a chunk at a time: a
        damaged length may ask for gigabytes."""
        parts, got = [], 0
        while got < n:
            try:
                chunk = self._f.read(min(n - got, CHUNK))
            except OSError as e:
                raise self._bad(f"cannot read at byte {self._pos + got}: {e.strerror}") from e
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        self._pos += got
        if got < n and self.regular:
            size = os.fstat(self._f.fileno()).st_size
            if size < self._pos:
                raise self._bad(f"the file shrank to {size} bytes while it was read at byte "
                                f"{self._pos} (truncated by another process: read it again "
                                "when that is done)")
        return b"".join(parts)

    def _next(self) -> Part | None:
        pos = self._pos
        head = self._read(FRAME.size)
        if not head:
            return None
        if len(head) < FRAME.size:
            self._cut(pos, None, self._pos)
            return None
        kind, length, crc = FRAME.unpack(head)
        if kind not in KINDS:
            raise self._bad(f"corrupt recording at byte {pos} (unknown part {kind:#x})")
        size = os.fstat(self._f.fileno()).st_size if self.regular else None
        if size is not None and pos + FRAME.size + length > size:
            # past the end of a file: looked at with pread, never read into memory
            self._past_end(pos, kind, length, crc, Span(pos + FRAME.size, size,
                                                        fd=self._f.fileno()))
            return None
        payload = self._read(length)
        if len(payload) < length:  # past the end of a stream: what came is all there is
            self._past_end(pos, kind, length, crc, Span(pos + FRAME.size, self._pos,
                                                        buf=payload))
            return None
        if zlib.crc32(payload) != crc:
            raise self._bad(f"corrupt recording at byte {pos} (checksum mismatch: its "
                            "payload or its length is damaged)")
        return self._decode(pos, chr(kind), payload)

    def _past_end(self, pos: int, kind: int, length: int, crc: int, span: Span) -> None:
        """A part whose length runs past the end: a damaged length (raise) or the cut."""
        claim = (f"corrupt recording at byte {pos}: its {NAMES[kind]} part claims {length} "
                 f"bytes, past the end of the file at byte {span.end}")
        if span.end > span.start and span.crc(span.start) == crc:
            raise self._bad(f"{claim}, but its checksum matches the {span.end - span.start} "
                            "bytes there: a damaged length field")
        after = valid_frame_after(span, [lay.size for lay in self.layouts])
        if after is not None:
            raise self._bad(f"{claim}, yet a valid part starts at byte {after}: a damaged "
                            f"length field, with {span.end - after} bytes of intact parts after "
                            "it")
        self._cut(pos, kind, span.end)

    def _decode(self, pos: int, k: str, payload: bytes) -> Part:
        if not self.layouts and k != "H":
            raise self._bad(f"no header: the first part, at byte {pos}, is {_a(NAMES[ord(k)])} "
                            "part")
        if self.complete:
            raise self._bad(f"corrupt recording at byte {pos} ({_a(NAMES[ord(k)])} part after "
                            "the end part)")
        if k == "R":
            if len(payload) < EVENT_INDEX.size:
                raise self._bad(f"corrupt recording at byte {pos} (empty record part)")
            (event,) = EVENT_INDEX.unpack_from(payload)
            records = payload[EVENT_INDEX.size:]
            if event >= len(self.layouts) or len(records) % self.layouts[event].size:
                raise self._bad(f"corrupt recording at byte {pos} (records of event {event} "
                                "do not fit its layout)")
            if not records:
                return Part(k, event=event, data=records)
            # Every record starts with its u64 CLOCK_MONOTONIC timestamp.
            (ts,) = struct.unpack_from("<Q", records, len(records) - self.layouts[event].size)
            self._last_record_ns = max(ts, self._last_record_ns or 0)
            orders = self._orders[event]
            # An order is a shift count everywhere downstream (1 << order PTEs): no kernel
            # collapses above the PMD order, and a crafted 2^32 would exhaust memory.
            if orders is not None and max(orders.iter_unpack(records))[0] > PMD_ORDER:
                raise self._bad(f"corrupt recording at byte {pos} (records of event "
                                f"{self.layouts[event].name} carry an order above the PMD "
                                f"order, {PMD_ORDER})")
            return Part(k, event=event, data=records)
        try:
            meta = json.loads(payload)
        except (ValueError, RecursionError) as e:
            raise self._bad(f"corrupt recording at byte {pos} (bad JSON)") from e
        if k == "H":
            if self.layouts:
                raise self._bad(f"corrupt recording at byte {pos} (a second header)")
            return Part(k, meta=meta)
        try:
            if k == "P":
                shapes.check(shapes.PAGES, meta, "")
            else:
                shapes.check_stats(meta)
        except shapes.ShapeError as e:
            raise self._bad(f"the {NAMES[ord(k)]} part at byte {pos} is not what khmon "
                            f"writes: {e}") from e
        if k in "SE":
            self._last_stats = meta
        self.complete = k == "E"
        return Part(k, meta=meta)

    def _seconds(self, ns: int) -> str:
        return f"{(ns - self.header['start_mono_ns']) / 1e9:.1f} s"

    def _loss(self) -> str:
        """What a recording without its end part covers, and what it cannot say."""
        stats = self._last_stats
        last = self._last_record_ns
        if stats is None:
            return ("it has no stats part, so the kernel's counters and lost events over it "
                    "are unknown")
        when = self._seconds(stats["mono_ns"])
        later = (f"; records after it, up to {self._seconds(last)}, are counted"
                 if last is not None and last > stats["mono_ns"] else "")
        return (f"the kernel's counters and lost events end at its last stats part, at "
                f"{when}{later}; events the probes had seen by then that never reached the "
                "file are counted as lost in the cut (the report's lost-events lines), and "
                "what the probes saw after it cannot be known")

    def _cut(self, pos: int, kind: int | None, end: int) -> None:
        if not self.layouts:
            return  # in the header: __init__ refuses the file
        what = f"an incomplete {NAMES[kind]} part" if kind is not None else "an incomplete part"
        self.warnings.append(f"recording cut short: the last {end - pos} bytes, from byte "
                             f"{pos}, are {what}; {self._loss()}")

    def parts(self) -> Iterator[Part]:
        """The parts after the header, in order."""
        while (part := self._next()) is not None:
            yield part
        if self.complete:
            return
        pid = running_recorder(self.header)
        if pid is not None:  # then an incomplete last part is one being written
            self.warnings = [f"recording still being written (its recorder, pid {pid}, is "
                             f"running): read up to byte {self._pos}; {self._loss()}"]
        elif not self.warnings:
            self.warnings.append("recording has no end part (its recorder was killed, or its "
                                 f"disk filled); {self._loss()}")
