"""The daemon's local socket API: newline-delimited JSON over a Unix stream socket.

docs/socket.md is the protocol. The server is one thread with a selector; it never blocks
on a client. Each connection has a bounded output buffer: a response is queued only while
the client's unsent output is under `out_cap` (one large response always fits), otherwise
the client is disconnected and counted, so a client that stops reading costs the daemon
nothing but that buffer. Input lines are bounded too (64 KiB, then the connection closes),
and so is the number of clients.

Snapshot responses are encoded once per (snapshot, list cap) and shared by every client.
A PMD request needs the model itself, which only the pipeline's worker may touch: it is
handed to a helper thread that waits for the worker (khmon.pipeline.LivePipeline.call), and
while it waits that client's later requests wait too (responses stay in request order);
other clients are served meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import grp
import json
import os
import selectors
import socket
import stat
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EXIT_BAD_INPUT, KhmonError
from ..model.model import Snapshot

PROTOCOL = 1
MAX_LINE = 64 * 1024
OUT_CAP = 1 << 20
MAX_CLIENTS = 64
TOP_DEFAULT = 20
TOP_MAX = 200  # list entries per answer at most (the daemon's snapshots hold this many)
GROUP = "khmon"
REQUESTS = ("hello", "snapshot", "pmd")


@dataclass
class _Client:
    sock: socket.socket
    cid: int  # unique for the server's life (a file descriptor is reused)
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    waiting: bool = False  # a pmd request is with the worker
    closing: bool = False  # close once outbuf is sent


class ApiServer:
    """Serves `latest()` snapshots and `pmd(pid, address)` records on a Unix socket."""

    def __init__(self, path: Path, latest: Callable[[], Snapshot | None],
                 pmd: Callable[[int, int], dict[str, Any] | None], kernel: str,
                 out_cap: int = OUT_CAP, max_clients: int = MAX_CLIENTS,
                 process_pmds: Callable[[int, int], list[dict[str, Any]]] = lambda p, n: []
                 ) -> None:
        """`pmd(pid, address)`: one PMD's record; `process_pmds(pid, n)`: that process's
        n most recently active ones. Both read the model itself (the pipeline's worker
        runs them) and may take a poll interval."""
        self.path = path
        self.latest = latest
        self.pmd = pmd
        self.process_pmds = process_pmds
        self.out_cap = out_cap
        self.max_clients = max_clients
        self.hello = {"ok": True, "khmon": __version__, "protocol": PROTOCOL, "pid": os.getpid(),
                      "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                      "kernel": kernel}
        self.requests: Counter[str] = Counter({r: 0 for r in (*REQUESTS, "bad")})
        self.disconnects: Counter[str] = Counter({r: 0 for r in ("slow_reader", "line_too_long",
                                                                 "too_many_clients", "error")})
        self.on_disconnect: Callable[[str], None] = lambda _why: None
        self._clients: dict[int, _Client] = {}
        self._cache: dict[int, tuple[int, bytes]] = {}  # top -> (seq, encoded response)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._done: list[tuple[int, int, bytes]] = []  # pmd answers: (fd, cid, response)
        self._next_cid = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="khmon-api-pmd")
        self._stop = False
        self._listener, self._inode = _listen(path)
        self._thread = threading.Thread(target=self._serve, name="khmon-api", daemon=True)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def start(self) -> ApiServer:
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every connection and the socket, and remove its path."""
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:  # not a newer daemon's socket
                self.path.unlink()
        self._listener.close()

    # --- the loop ---------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _serve(self) -> None:
        try:
            while not self._stop:
                for key, events in self._sel.select(timeout=1.0):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                        self._finish_pmds()
                    else:
                        client = self._clients.get(sock.fileno())  # type: ignore[union-attr]
                        if client is None:
                            continue
                        try:
                            if events & selectors.EVENT_READ:
                                self._read(client)
                            if events & selectors.EVENT_WRITE and client.sock.fileno() >= 0:
                                self._flush(client)
                        except Exception as e:  # a bug answering costs only this client
                            self._drop(client, "error", f"{type(e).__name__}: {e}")
        finally:
            for c in list(self._clients.values()):
                self._close(c)
            self._sel.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._clients) >= self.max_clients:
            self.disconnects["too_many_clients"] += 1
            sock.close()
            return
        sock.setblocking(False)
        self._next_cid += 1
        c = _Client(sock, self._next_cid)
        self._clients[sock.fileno()] = c
        self._sel.register(sock, selectors.EVENT_READ)

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(c)
            return
        c.inbuf += data
        self._lines(c)

    def _lines(self, c: _Client) -> None:
        """Answer the complete lines received, in order, until one must wait."""
        while not c.waiting and not c.closing and c.sock.fileno() >= 0:
            nl = c.inbuf.find(b"\n")
            if nl < 0:
                if len(c.inbuf) > MAX_LINE:
                    self._drop(c, "line_too_long")
                return
            line = bytes(c.inbuf[:nl])
            del c.inbuf[:nl + 1]
            if len(line) > MAX_LINE:
                self._drop(c, "line_too_long")
                return
            if line.strip():
                self._answer(c, line)
        self._want_input(c)

    def _answer(self, c: _Client, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            self.requests["bad"] += 1
            self._send(c, _error("a request is one JSON object per line"))
            return
        kind = req.get("req")
        if kind not in REQUESTS:
            self.requests["bad"] += 1
            self._send(c, _error(f"unknown request {kind!r} (known: {', '.join(REQUESTS)})"))
            return
        self.requests[kind] += 1
        if kind == "hello":
            self._send(c, _encode(self.hello))
        elif kind == "snapshot":
            pid = req.get("pid")
            if pid is None:
                self._send(c, self._snapshot(req.get("top", TOP_DEFAULT)))
            else:
                self._snapshot_of(c, pid, req.get("top", TOP_DEFAULT))
        else:
            self._ask_pmd(c, req)

    def _snapshot(self, top: Any) -> bytes:
        """The latest snapshot's answer, encoded once per (snapshot, list cap)."""
        snap, top, err = self._snapshot_args(top)
        if err is not None:
            return err
        hit = self._cache.get(top)
        if hit is not None and hit[0] == snap.seq:
            return hit[1]
        body = _encode(_snapshot_answer(snap, top))
        if len(self._cache) > 8:
            self._cache.clear()
        self._cache[top] = (snap.seq, body)
        return body

    def _snapshot_args(self, top: Any) -> tuple[Any, int, bytes | None]:
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            return None, 0, _error("top is a count of list entries (0 or more)")
        snap = self.latest()
        if snap is None:
            return None, 0, _encode({"ok": False, "state": "starting", "error": "no snapshot "
                                     "yet: the daemon is still attaching its probes"})
        return snap, min(top, TOP_MAX), None

    def _snapshot_of(self, c: _Client, pid: Any, top: Any) -> None:
        """A snapshot with that process's own most recently active PMD records beside it
        (process_pmds), which the model gives on the worker: answered like a pmd request."""
        snap, top, err = self._snapshot_args(top)
        if err is None and (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0):
            err = _error("pid is a process id (a number above 0)")
        if err is not None:
            self._send(c, err)
            return

        def answer() -> bytes:
            pmds = self.process_pmds(pid, top)
            return _encode({**_snapshot_answer(snap, top),
                            "process_pmds": {"pid": pid, "pmds": pmds[:top]}})

        self._later(c, answer)

    def _ask_pmd(self, c: _Client, req: dict[str, Any]) -> None:
        pid, address = req.get("pid"), req.get("address")
        if isinstance(address, str):
            try:
                address = int(address, 0)
            except ValueError:
                address = None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 \
                or not isinstance(address, int) or isinstance(address, bool) or address < 0:
            self._send(c, _error('a pmd request names a pid (a number) and an address '
                                 '("0x7f...200000" or a number)'))
            return

        def answer() -> bytes:
            rec = self.pmd(pid, address)
            return _encode({"ok": True, "pmd": rec}) if rec is not None \
                else _error("no such PMD record")

        self._later(c, answer)

    def _later(self, c: _Client, answer: Callable[[], bytes]) -> None:
        """Answer on the helper thread (it waits for the model); this client's later
        requests wait, other clients are served meanwhile."""
        c.waiting = True
        self._want_input(c)
        fd, cid = c.sock.fileno(), c.cid

        def run() -> None:
            try:
                body = answer()
            except TimeoutError as e:
                body = _error(f"the model is not answering ({e or 'busy'})")
            except Exception as e:  # a bug: this client gets the error, the server goes on
                body = _error(f"{type(e).__name__}: {e}")
            with self._lock:
                self._done.append((fd, cid, body))
            self._wake()

        self._pool.submit(run)

    def _finish_pmds(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for fd, cid, body in done:
            c = self._clients.get(fd)
            if c is None or c.cid != cid:
                continue  # it went away meanwhile
            c.waiting = False
            self._send(c, body)
            self._lines(c)

    # --- output -----------------------------------------------------------------------------

    def _send(self, c: _Client, body: bytes) -> None:
        if c.sock.fileno() < 0:
            return
        if len(c.outbuf) >= self.out_cap:
            self._drop(c, "slow_reader")
            return
        c.outbuf += body
        self._flush(c)

    def _flush(self, c: _Client) -> None:
        try:
            n = c.sock.send(c.outbuf)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close(c)
            return
        del c.outbuf[:n]
        if c.closing and not c.outbuf:
            self._close(c)
            return
        self._want_input(c)

    def _want_input(self, c: _Client) -> None:
        """Read while no request waits; write while output is pending."""
        if c.sock.fileno() < 0:
            return
        events = (0 if c.waiting or c.closing else selectors.EVENT_READ) \
            | (selectors.EVENT_WRITE if c.outbuf else 0)
        key = self._sel.get_map().get(c.sock)
        if events == 0:
            if key is not None:
                self._sel.unregister(c.sock)
        elif key is None:
            self._sel.register(c.sock, events)
        elif key.events != events:
            self._sel.modify(c.sock, events)

    def _drop(self, c: _Client, why: str, detail: str = "") -> None:
        self.disconnects[why] += 1
        self.on_disconnect(f"{why}: {detail}" if detail else why)
        self._close(c)

    def _close(self, c: _Client) -> None:
        self._clients.pop(c.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()


def _snapshot_answer(snap: Snapshot, top: int) -> dict[str, Any]:
    r = snap.report
    return {"ok": True, "seq": snap.seq, "mono_ns": snap.mono_ns, "wall": snap.wall,
            "report": {**r, "processes": r["processes"][:top], "pmds": r["pmds"][:top]},
            "processes_total": snap.processes_total, "pmds_total": snap.pmds_total}


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _error(msg: str) -> bytes:
    return _encode({"ok": False, "error": msg})


def _listen(path: Path) -> tuple[socket.socket, int]:
    """Bind the socket (and give its inode): mode 0660, group khmon where that group
    exists. A stale socket (nobody answers) is replaced; a live one means another daemon
    runs."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise KhmonError(f"{path} exists and is not a socket", "give another --socket",
                             EXIT_BAD_INPUT)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise KhmonError(f"another khmon daemon answers on {path}",
                             "stop it, or give another --socket")
        except OSError:
            path.unlink()  # stale: its daemon is gone
        finally:
            probe.close()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)  # 0660 from the start: never briefly wider
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        with contextlib.suppress(KeyError, PermissionError):
            os.chown(path, -1, grp.getgrnam(GROUP).gr_gid)
        os.chmod(path, 0o660)
        sock.listen(16)
        sock.setblocking(False)
        inode = path.stat().st_ino
    except OSError as e:
        raise KhmonError(f"cannot listen on {path}: {e.strerror}",
                         "give a writable --socket path") from e
    return sock, inode
