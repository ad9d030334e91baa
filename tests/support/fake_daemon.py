"""A socket server speaking the daemon's protocol (docs/socket.md) from answers a test gives.

For protocol tests of `khmon top`'s client and its headless UI tests: it answers `hello`,
`snapshot` and `pmd` on a real Unix socket, one JSON line per request line, and can be made
slow, silent, restarted (a new pid and start time, seq from 1) or stopped, which a real
daemon cannot be made to do on cue. It is not the daemon (tests/support/daemon.py runs that):
what it answers is what the test asked for, so it proves the client, not the server.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SnapshotFn = Callable[[int, dict[str, Any]], dict[str, Any]]


class FakeDaemon:
    """`report(seq, request)` gives the report of the seq-th snapshot. `delay` seconds pass
    before each answer; `raw` (bytes) replaces the next answer but a hello's, to send garbage;
    `repeats` snapshot answers after the next one repeat its seq (no new snapshot made yet)."""

    def __init__(self, path: Path, report: SnapshotFn, pid: int = 4242) -> None:
        self.path = path
        self.report = report
        self.pid = pid
        self.started = f"2026-12-02T00:00:{pid % 60:02d}+00:00"
        self.seq = 0
        self.delay = 0.0
        self.raw: bytes | None = None
        self.repeats = 0
        self._repeat_left = 0
        self.requests: list[dict[str, Any]] = []
        self.pmds: dict[tuple[int, str], dict[str, Any]] = {}
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()

    def start(self) -> FakeDaemon:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._stop.clear()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        """Go away: close the socket and every connection, remove the path."""
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._conns.clear()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def restart(self) -> None:
        """A new daemon: another pid and start time, and seq from 1 again."""
        self.stop()
        self.pid += 1
        self.started = f"2026-12-02T00:01:{self.pid % 60:02d}+00:00"
        self.seq = 0
        self.start()

    def _accept(self) -> None:
        while not self._stop.is_set() and self._listener is not None:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn.makefile("rb") as rf:
            for line in rf:
                req = json.loads(line)
                self.requests.append(req)
                if self.delay:
                    time.sleep(self.delay)
                if self._stop.is_set():
                    return
                if self.raw is not None and req.get("req") != "hello":
                    out, self.raw = self.raw, None
                else:
                    out = json.dumps(self._answer(req)).encode() + b"\n"
                conn.sendall(out)

    def _answer(self, req: dict[str, Any]) -> dict[str, Any]:
        kind = req.get("req")
        if kind == "hello":
            return {"ok": True, "khmon": "test", "protocol": 1, "pid": self.pid,
                    "started": self.started, "kernel": "test"}
        if kind == "snapshot":
            if self._repeat_left and self.seq:
                self._repeat_left -= 1
            else:
                self.seq += 1
                self._repeat_left = self.repeats
            rep = self.report(self.seq, req)
            return {"ok": True, "seq": self.seq, "mono_ns": self.seq * 1_000_000_000,
                    "wall": None, "report": rep, "processes_total": len(rep.get("processes", ())),
                    "pmds_total": len(rep.get("pmds", ()))}
        if kind == "pmd":
            rec = self.pmds.get((req.get("pid"), req.get("address")))
            return {"ok": True, "pmd": rec} if rec else {"ok": False,
                                                         "error": "no such PMD record"}
        return {"ok": False, "error": f"unknown request {kind!r}"}


@contextlib.contextmanager
def fake_daemon(path: Path, report: SnapshotFn, pid: int = 4242) -> Iterator[FakeDaemon]:
    d = FakeDaemon(path, report, pid).start()
    try:
        yield d
    finally:
        d.stop()
