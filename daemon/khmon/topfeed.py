"""khmon top's own feed: a child process that answers the daemon's socket protocol
(docs/socket.md) on one end of a socketpair, from a capture of its own or a recording.

`khmon top` starts it before its UI when no daemon runs (or with --local / --replay), so
the bcc compile runs while the screen comes up, decoding never shares a thread with the
screen, and the UI process never imports bcc. It is the same protocol as the daemon's, so
`khmon top` has one client for all its sources.

    python -m khmon.topfeed --fd N --local [-p PID]     a live capture (root)
    python -m khmon.topfeed --fd N --replay FILE        a recording, frame by frame

A capture answers `hello` at once (`state`: compiling, then attached) and `snapshot` with
`{"ok": false, "state": "compiling"}` until the probes are attached. A replay moves on a
snapshot request's `step` (1: the next frame, -1: one back, 0 or none: stay), one frame
per stats part, and says which frame it is (`frame`) and whether the recording has ended
(`end`). Both take a snapshot request's `pid`: that process's PMD records come beside the
report, as `process_pmds` (`pid`, `pmds`).

The child stops, detaching its probes, on SIGTERM, SIGHUP, or when the socket closes (the
UI went away, however it went); PR_SET_PDEATHSIG covers a UI killed outright. Errors go to
stderr as one line, `khmon: error: ...`, which the UI shows.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import KhmonError
from .model.model import Model, Snapshot
from .stream.parts import END, STATS

TOP_MAX = 200  # as the daemon: list entries per answer at most
MAX_LINE = 64 << 10  # a longer request closes the connection (as the daemon)
REPLAY_FRAMES = 256  # frames a replay can step back through
EXIT_GRACE_S = 60.0  # an exited process's row stays this long
PR_SET_PDEATHSIG = 1

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def serve(sock: socket.socket, handle: Handler, stop: threading.Event) -> None:
    """Answer requests, one JSON line each, until the peer closes; then set `stop`."""
    try:
        with sock.makefile("rb") as rf:
            while not stop.is_set():
                line = rf.readline(MAX_LINE + 1)
                if not line or len(line) > MAX_LINE:
                    break
                try:
                    req = json.loads(line)
                    ans = handle(req) if isinstance(req, dict) else {
                        "ok": False, "error": "a request is a JSON object"}
                except ValueError:
                    ans = {"ok": False, "error": "not JSON"}
                sock.sendall(json.dumps(ans).encode() + b"\n")
    except OSError:
        pass
    finally:
        stop.set()


def top_of(req: dict[str, Any]) -> int:
    top = req.get("top", 20)
    return max(1, min(TOP_MAX, top)) if isinstance(top, int) else 20


def pmds_of(model: Model, pid: int, top: int) -> list[dict[str, Any]]:
    """That process's PMD records, most recently active first (a snapshot's `pid`)."""
    recs = [p for proc in model.processes.procs.values() if proc.pid == pid
            for p in proc.pmds.values()]
    recs.sort(key=lambda p: p.last_ns, reverse=True)
    return [j for p in recs[:top] if (j := model.pmd_json(pid, p.address)) is not None]


def answer(snap: Snapshot, req: dict[str, Any], pmds: list[dict[str, Any]] | None,
           **extra: Any) -> dict[str, Any]:
    """The protocol's snapshot answer; `pmds`: the requested pid's PMD records, answered
    beside the report as `process_pmds` (the report keeps its most recent ones)."""
    top = top_of(req)
    report = {**snap.report, "processes": snap.report["processes"][:top],
              "pmds": snap.report["pmds"][:top]}
    if pmds is not None:
        extra["process_pmds"] = {"pid": req["pid"], "pmds": pmds[:top]}
    return {"ok": True, "seq": snap.seq, "mono_ns": snap.mono_ns, "wall": snap.wall,
            "report": report, "processes_total": snap.processes_total,
            "pmds_total": snap.pmds_total, **extra}


def pmd_answer(model_call: Callable[[Callable[[Model], Any]], Any],
               req: dict[str, Any]) -> dict[str, Any]:
    try:
        pid, address = int(req["pid"]), int(str(req["address"]), 16)
    except (KeyError, TypeError, ValueError):
        return {"ok": False, "error": "pmd needs pid and address (hex)"}
    rec = model_call(lambda m: m.pmd_json(pid, address))
    return {"ok": True, "pmd": rec} if rec is not None else {"ok": False,
                                                             "error": "no such PMD record"}


def _wanted_pid(req: dict[str, Any]) -> int | None:
    pid = req.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def _hello(state: str, kernel: str | None, **extra: Any) -> dict[str, Any]:
    return {"ok": True, "khmon": __version__, "protocol": 1, "pid": os.getpid(),
            "started": STARTED, "kernel": kernel, "state": state, **extra}


STARTED = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class LiveFeed:
    """A capture of its own: compile, attach, then a pipeline (khmon.pipeline) whose worker
    owns the model; requests are answered from the worker between polls."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.state = "compiling"
        self.run: Any = None  # the LivePipeline once attached
        self._last: Snapshot | None = None
        self._lock = threading.Lock()

    def _call(self, fn: Callable[[Model], Any]) -> Any:
        try:
            return self.run.call(fn)
        except TimeoutError:  # ended: the model is the worker's no more, and still
            return fn(self.run.model)

    def _fresh(self, m: Model) -> Snapshot:
        """A snapshot with the most entries an answer can have, built again only when a
        stats part moved the stream on (the same stream time twice is no time for a
        rate, and the pipeline's own snapshots hold only 20 of each)."""
        if self._last is None or self._last.mono_ns != m.now_ns:
            self._last = m.snapshot(TOP_MAX)
        return self._last

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        kind = req.get("req")
        if kind == "hello":
            return _hello(self.state, os.uname().release)
        if self.run is None:
            return {"ok": False, "error": self.state, "state": self.state}
        if kind == "snapshot":
            pid = _wanted_pid(req)
            if self.run.snapshot is None:  # no stats part yet: nothing to rate from
                return {"ok": False, "error": "attached; first snapshot in a second",
                        "state": "starting"}
            with self._lock:  # one build at a time
                snap, pmds = self._call(lambda m: (self._fresh(m), None if pid is None
                                                   else pmds_of(m, pid, top_of(req))))
            return answer(snap, req, pmds)
        if kind == "pmd":
            return pmd_answer(self._call, req)
        return {"ok": False, "error": f"unknown request {kind!r}"}

    def main(self, stop: threading.Event) -> int:
        from .capture.bpfgen import ProbeConfig
        from .capture.live import LiveCapture
        from .pipeline import LivePipeline

        cap = LiveCapture(ProbeConfig(filter_tgid=self.pid))
        if stop.is_set():
            cap.probes.close()
            return 0
        run = LivePipeline(cap, exit_grace_s=EXIT_GRACE_S)
        attached = sum(v is None for v in run.header["attached"].values())
        self.run = run.start()
        self.state = f"attached to {attached} tracepoints"
        run.wait(stop.is_set)
        return 0


class ReplayFeed:
    """A recording played frame by frame: each stats part is a frame; the last
    REPLAY_FRAMES are kept for stepping back."""

    def __init__(self, path: Path) -> None:
        from .stream.recording import Reader

        self.reader = Reader(path)
        self.model = Model(self.reader.header, self.reader.layouts)
        self.parts: Iterator[Any] = self.reader.parts()
        self.frames: deque[Snapshot] = deque(maxlen=REPLAY_FRAMES)
        self.made = 0
        self.pos = -1
        self.ended = False

    def _advance(self) -> bool:
        """Feed parts up to the next stats part and snapshot there; False at the end."""
        for part in self.parts:
            self.model.add(part)
            if part.kind in (STATS, END):
                self.frames.append(self.model.snapshot(TOP_MAX))
                self.made += 1
                return True
        self.ended = True
        return False

    def step(self, n: int) -> None:
        if n >= 0 and self.pos < 0:
            n = max(n, 1)
        for _ in range(max(0, n)):
            if self.pos < len(self.frames) - 1:
                self.pos += 1
            elif self._advance():
                self.pos = len(self.frames) - 1
        if n < 0:
            self.pos = max(0, self.pos + n)
        if not self.frames:
            self.pos = -1

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        kind = req.get("req")
        if kind == "hello":
            return _hello("replay", self.reader.header["kernel"]["release"])
        if kind == "pmd":
            return pmd_answer(lambda fn: fn(self.model), req)
        if kind != "snapshot":
            return {"ok": False, "error": f"unknown request {kind!r}"}
        step = req.get("step", 0)
        self.step(step if isinstance(step, int) else 0)
        if self.pos < 0:
            return {"ok": False, "error": "the recording has no stats part"}
        snap = self.frames[self.pos]
        pid = _wanted_pid(req)
        pmds = pmds_of(self.model, pid, top_of(req)) if pid is not None else None
        return answer(snap, req, pmds, frame=self.made - len(self.frames) + self.pos + 1,
                      end=self.ended and self.pos == len(self.frames) - 1)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m khmon.topfeed",
                                 description="khmon top's child feed (not for direct use)")
    ap.add_argument("--fd", type=int, required=True, help="the socket to serve on")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--local", action="store_true")
    what.add_argument("--replay", type=Path)
    ap.add_argument("-p", "--pid", type=int, default=0)
    args = ap.parse_args(argv)
    _die_with_parent()
    sock = socket.socket(fileno=args.fd)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()  # a capture: the main thread waits on this, then detaches
        if args.replay is not None:  # a replay: the main thread is reading the socket
            raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the UI's to handle
    try:
        if args.replay is not None:
            serve(sock, ReplayFeed(args.replay).handle, stop)
            return 0
        feed = LiveFeed(args.pid)
        threading.Thread(target=serve, args=(sock, feed.handle, stop), daemon=True,
                         name="khmon-topfeed").start()
        return feed.main(stop)
    except KhmonError as e:
        print(f"khmon: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
