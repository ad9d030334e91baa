"""The flight recorder: a long-running stream kept as khmon recordings, rotated by size,
within a total cap on disk.

`khmon daemon --record-dir DIR` hands every part of its stream to a FlightRecorder, which
writes them to `DIR/khmon-<UTC start>.khrec` files (khmon.stream.recording.Writer: one
write per frame, so a file survives a SIGKILL up to its last complete part) and points
`DIR/current.khrec` at the one being written. A file is closed and a new one started at a
stats part boundary once the file reaches its size, or at the first stats part after
rotate_soon() (SIGHUP); the closed file ends with an end part repeating that stats part's
counts, so it reads as a complete window. Before a file is started the oldest recordings in DIR are removed
until the ones kept plus a full new file fit in `max_bytes` (only files named like khmon's
own: nothing else in DIR is ever touched).

Each file is a recording on its own, readable by `khmon report FILE`: its header is the
capture's, with the start moved to the stats part the file begins at (time, the kernel's
counters, the settings in force), and the in-kernel counters of its stats parts (seen, lost,
missed, the exact collapse counts and their histogram, the PMDs whose detail was lost, the
pagemap source's reads) are rebased to count from there. So a file's report covers its own
window, and its accounting balances the way a recording's does, except for the repeats the
in-kernel dedup held across a file boundary (at most an epoch, a second, of a PMD's
rescans), which land in the next file.

A write that fails (a full disk) stops the recording, not the daemon: the error is logged
and counted, and the recorder starts a new file at the first stats part 60 s later.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import EXIT_BAD_INPUT, KhmonError
from .parts import END, STATS, Part
from .recording import Writer

PREFIX, SUFFIX = "khmon-", ".khrec"
CURRENT = "current.khrec"
MIN_FILE_BYTES = 1 << 20
FILES_PER_CAP = 8  # a file is at most max_bytes / 8: the oldest eighth goes at a time
RETRY_S = 60.0
MAX_LOST_KEYS = 16384  # as khmon.model.model: (mm, PMD) loss counters followed
# What a stats part says once, as news (settings that changed, processes that exited, PMDs
# that lost detail): not repeated in the end part that closes a rotated file.
ONCE = ("settings", "exited", "lost_pmds")


def file_bytes_for(max_bytes: int) -> int:
    """The size at which a file is rotated: an eighth of the cap, at least 1 MiB."""
    return max(MIN_FILE_BYTES, max_bytes // FILES_PER_CAP)


class FlightRecorder:
    """Takes the parts of one live stream, as khmon.stream.recording.Writer does
    (add(), close(), bytes_written), and keeps them in rotated files under a cap."""

    def __init__(self, directory: Path, max_bytes: int, header: dict[str, Any],
                 file_bytes: int | None = None, log: Callable[[str], None] = lambda _m: None
                 ) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.file_bytes = file_bytes or file_bytes_for(max_bytes)
        if self.file_bytes > max_bytes:
            raise KhmonError(f"--record-max-bytes {max_bytes} is smaller than one recording "
                             f"file ({self.file_bytes} bytes)", "give at least 8M",
                             EXIT_BAD_INPUT)
        self.header = header
        self.log = log
        self.bytes_written = 0  # across every file of this run
        self.rotations = 0
        self.removed = 0  # old files removed to stay under the cap
        self.write_errors = 0
        self.writer: Writer | None = None
        self._done = 0  # bytes of the files closed before the current one
        self._hup = False
        self._retry_at: float | None = None
        self._settings = dict(header.get("settings") or {})
        self._base: dict[str, Any] = {}  # in-kernel counters where the current file starts
        self._lost_last: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._lost_base: dict[tuple[int, int], int] = {}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KhmonError(f"cannot create the record directory {self.dir}: {e.strerror}",
                             "give a writable --record-dir") from e
        self._open(header)  # a failure here is the caller's to report: nothing ran yet

    # --- what the pipeline calls ------------------------------------------------------------

    def add(self, part: Part) -> None:
        if part.kind in (STATS, END):
            self._track(part.meta)
        if self.writer is None:
            if part.kind == STATS and self._retry_at is not None \
                    and time.monotonic() >= self._retry_at:
                self._start_at(part.meta, "after a write error")
            return
        rotate = part.kind == STATS and (self._hup or self.writer.bytes_written
                                          >= self.file_bytes)
        try:
            out = self._rebased(part) if self._base else part
            self.writer.add(out)
            if rotate:  # this file's window ends here: its end part repeats these counts
                self.writer.add(Part(END, meta={k: v for k, v in out.meta.items()
                                                if k not in ONCE}))
        except KhmonError as e:
            self._failed(e)
            return
        self.bytes_written = self._done + self.writer.bytes_written
        if rotate:
            why = "SIGHUP" if self._hup else f"{self.writer.bytes_written} bytes"
            self._hup = False
            self._close_current()
            self._start_at(part.meta, why)

    def close(self) -> None:
        self._close_current()

    def rotate_soon(self) -> None:
        """Start a new file at the next stats part (SIGHUP; safe from a signal handler)."""
        self._hup = True

    # --- files ------------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        return self.writer.path if self.writer is not None else None

    def kept(self) -> list[Path]:
        """khmon's recordings in the directory, oldest first."""
        out = []
        for p in self.dir.glob(f"{PREFIX}*{SUFFIX}"):
            with contextlib.suppress(OSError):
                out.append((p.stat().st_mtime, p.name, p))
        return [p for _t, _n, p in sorted(out)]

    def kept_bytes(self) -> int:
        total = 0
        for p in self.kept():
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    def _make_room(self) -> None:
        """Remove the oldest recordings until those left plus a full new file fit the cap."""
        files = [(p, p.stat().st_size) for p in self.kept() if p.exists()]
        total = sum(size for _p, size in files)
        gone = []
        while files and total + self.file_bytes > self.max_bytes:
            p, size = files.pop(0)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            total -= size
            gone.append(p.name)
        if gone:
            self.removed += len(gone)
            self.log(f"flight recorder: removed {len(gone)} old recording(s) to stay under "
                     f"{self.max_bytes} bytes ({', '.join(gone)})")

    def _new_path(self) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = self.dir / f"{PREFIX}{stamp}{SUFFIX}"
        n = 1
        while path.exists():
            n += 1
            path = self.dir / f"{PREFIX}{stamp}-{n}{SUFFIX}"
        return path

    def _open(self, header: dict[str, Any]) -> None:
        self._make_room()
        self._done = self.bytes_written
        self.writer = Writer(self._new_path(), header)
        self.bytes_written = self._done + self.writer.bytes_written
        link = self.dir / f".{CURRENT}.tmp"
        with contextlib.suppress(OSError):
            link.unlink(missing_ok=True)
            link.symlink_to(self.writer.path.name)
            os.replace(link, self.dir / CURRENT)

    def _close_current(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _start_at(self, meta: dict[str, Any], why: str) -> None:
        """A new file whose window starts at this stats part."""
        old = self.path
        header = {**self.header, "start_mono_ns": meta["mono_ns"],
                  "start_wall": meta.get("wall", self.header.get("start_wall")),
                  "counters": dict(meta.get("counters") or self.header.get("counters") or {}),
                  "settings": dict(self._settings),
                  "flight_recorder": {"rotated_because": why}}
        try:
            self._open(header)
        except (KhmonError, OSError) as e:
            self._failed(e)
            return
        self._base = {**_probe_base(meta.get("probe") or {}),
                      "pagemap": {k: v for k, v in (meta.get("pagemap") or {}).items()
                                  if isinstance(v, int)}}
        self._lost_base = dict(self._lost_last)
        self._retry_at = None
        self.rotations += 1
        self.log(f"flight recorder: now writing {self.path} ({why}"
                 + (f"; {old.name} closed" if old else "") + ")")

    def _failed(self, e: Exception) -> None:
        self.write_errors += 1
        self._close_current()
        self._retry_at = time.monotonic() + RETRY_S
        self.log(f"flight recorder: {e}; recording stopped, retrying in {RETRY_S:.0f} s")

    # --- rebasing ---------------------------------------------------------------------------

    def _track(self, meta: dict[str, Any]) -> None:
        """What a file started at the next stats part needs: the settings in force and the
        PMD loss counters so far (both arrive only as changes)."""
        if isinstance(meta.get("settings"), dict):
            self._settings = dict(meta["settings"])
        for mm, address, n in meta.get("lost_pmds") or ():
            self._lost_last[(mm, address)] = n
            self._lost_last.move_to_end((mm, address))
            if len(self._lost_last) > MAX_LOST_KEYS:
                self._lost_last.popitem(last=False)

    def _rebased(self, part: Part) -> Part:
        if part.kind not in (STATS, END):
            return part
        meta = dict(part.meta)
        if isinstance(meta.get("probe"), dict):
            meta["probe"] = _rebase_probe(meta["probe"], self._base)
        if isinstance(meta.get("pagemap"), dict):
            meta["pagemap"] = {k: v - self._base["pagemap"].get(k, 0)
                               if isinstance(v, int) else v for k, v in meta["pagemap"].items()}
        if meta.get("lost_pmds"):
            meta["lost_pmds"] = [[mm, a, n - self._lost_base.get((mm, a), 0)
                                  if n >= self._lost_base.get((mm, a), 0) else n]
                                 for mm, a, n in meta["lost_pmds"]]
        return Part(part.kind, meta=meta)


def _probe_base(probe: dict[str, Any]) -> dict[str, Any]:
    """The cumulative in-kernel counters of a stats part, keyed for subtraction."""
    return {
        "counts": {k: dict(probe.get(k) or {}) for k in ("seen", "lost", "missed")},
        "exact": {(ev, o, s, u): (n, ns) for ev, rows in (probe.get("exact") or {}).items()
                  for o, s, u, n, ns, _mx in rows},
        "hist": {(ev, o, ok, b): n for ev, rows in (probe.get("hist") or {}).items()
                 for o, ok, b, n in rows},
        "exact_full": int(probe.get("exact_full") or 0),
    }


def _rebase_probe(probe: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The counters of `probe` since `base` (a maximum cannot be rebased: max_ns stays the
    capture's, an upper bound for the file)."""
    out = dict(probe)
    for k, before in base["counts"].items():
        if isinstance(probe.get(k), dict):
            out[k] = {name: v - before.get(name, 0) for name, v in probe[k].items()}
    if isinstance(probe.get("exact"), dict):
        out["exact"] = {}
        for ev, rows in probe["exact"].items():
            kept = []
            for o, s, u, n, ns, mx in rows:
                bn, bns = base["exact"].get((ev, o, s, u), (0, 0))
                if n > bn:
                    kept.append([o, s, u, n - bn, ns - bns, mx])
            out["exact"][ev] = kept
    if isinstance(probe.get("hist"), dict):
        out["hist"] = {ev: [[o, ok, b, n - base["hist"].get((ev, o, ok, b), 0)]
                            for o, ok, b, n in rows if n > base["hist"].get((ev, o, ok, b), 0)]
                       for ev, rows in probe["hist"].items()}
    if "exact_full" in probe:
        out["exact_full"] = int(probe["exact_full"] or 0) - base["exact_full"]
    return out
