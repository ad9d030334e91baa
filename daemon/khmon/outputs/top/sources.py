"""Where `khmon top` gets its snapshots: the daemon's socket, a child capture, a replay.

All three speak the daemon's socket protocol (docs/socket.md: one JSON request per line,
one JSON answer per line), so one client serves them: the daemon over its Unix socket, and
a child process (khmon.topfeed, a capture of its own or a replay) over a socketpair. The
child is started before the UI, so its compile runs while the screen comes up, and its
decoding never shares a CPU thread with the screen; the UI process never imports bcc.

Every request has a timeout and every failure becomes a SourceError with one line to
show; the source then counts a new `epoch`, which tells the rates (khmon.outputs.top.rates)
that a gap happened. The daemon's source reconnects on the next refresh; a child that
exited is gone, and says why (the last line it wrote on stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ...errors import EXIT_FAIL, KhmonError
from ...kernel.proc import cpu_seconds
from ...kernel.sysfs import khugepaged_pid

DEFAULT_SOCKET = Path("/run/khmon/khmon.sock")
TOP = 200  # list entries asked for (the daemon's maximum)
LINE_LIMIT = 32 << 20  # the longest answer read (a snapshot of TOP processes and PMDs is ~1 MB)
TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 1.0
DETACH_WAIT_S = 30.0  # how long quitting waits for a child's probes to detach
CHILD_TIMEOUT_S = 120.0  # a child not answering for this long is taken for hung


class SourceError(Exception):
    """A refresh that failed; str() is the line the header shows. `closed`: the peer
    closed the connection (a child that did so is exiting), rather than being slow."""

    def __init__(self, why: str, closed: bool = False) -> None:
        super().__init__(why)
        self.closed = closed


class NotReady(SourceError):
    """The source is alive but has no snapshot yet (a child still compiling)."""


@dataclass(frozen=True)
class Frame:
    """One snapshot as the UI gets it: the daemon's snapshot answer, plus where it came from
    and khugepaged's CPU time read when it arrived."""

    stream: str  # one stream's identity: daemon pid and start time, child pid, replay
    epoch: int  # the source's failures so far (rates do not cross one)
    seq: int
    mono_ns: int | None
    wall: str | None
    report: dict[str, Any]
    processes_total: int | None
    pmds_total: int | None
    cpu_s: float | None  # khugepaged's CPU seconds (None: replay, or not readable)
    local_s: float  # time.monotonic() when it arrived
    replay_frame: int | None = None
    replay_end: bool = False
    process_pmds: dict[str, Any] | None = None  # a `pid` request's answer: pid, pmds


class KhugepagedCpu:
    """khugepaged's CPU time, for its CPU share in the header. The thread's pid is looked up
    again when it goes away (THP enabled=never stops it), at most every 10 s."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self._looked = -1e9

    def __call__(self) -> float | None:
        if self.pid is not None:
            v = cpu_seconds(self.pid)
            if v is not None:
                return v
            self.pid = None
        if time.monotonic() - self._looked > 10:
            self._looked = time.monotonic()
            with contextlib.suppress(OSError):
                self.pid = khugepaged_pid()
            if self.pid is not None:
                return cpu_seconds(self.pid)
        return None


class Connection:
    """One protocol connection: request() writes a line and reads the answer's line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._lock = asyncio.Lock()  # one request at a time: answers come in order

    async def request(self, req: dict[str, Any], timeout: float = TIMEOUT_S) -> dict[str, Any]:
        async with self._lock:
            try:
                self.writer.write(json.dumps(req).encode() + b"\n")
                await asyncio.wait_for(self.writer.drain(), timeout)
                line = await asyncio.wait_for(self.reader.readline(), timeout)
            except TimeoutError:
                raise SourceError(f"no answer to {req.get('req')} in {timeout:g} s") from None
            except (OSError, ValueError, asyncio.LimitOverrunError) as e:
                raise SourceError(f"connection failed: {e}", closed=True) from None
        if not line:
            raise SourceError("connection closed", closed=True)
        try:
            ans = json.loads(line)
        except ValueError:
            raise SourceError("an answer that is not JSON") from None
        if not isinstance(ans, dict):
            raise SourceError("an answer that is not a JSON object")
        return ans

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _frame(ans: dict[str, Any], stream: str, epoch: int, cpu: float | None) -> Frame:
    report = ans.get("report")
    if not isinstance(report, dict) or not isinstance(ans.get("seq"), int):
        raise SourceError("a snapshot without report or seq")

    def opt_int(k: str) -> int | None:
        v = ans.get(k)
        return v if isinstance(v, int) else None

    return Frame(stream, epoch, ans["seq"], opt_int("mono_ns"),
                 ans.get("wall") if isinstance(ans.get("wall"), str) else None, report,
                 opt_int("processes_total"), opt_int("pmds_total"), cpu, time.monotonic(),
                 opt_int("frame"), bool(ans.get("end")),
                 ans["process_pmds"] if isinstance(ans.get("process_pmds"), dict) else None)


class Source:
    """What the app asks of any source. Subclasses connect in their own way."""

    label = "?"
    replay = False
    min_timeout = 0.0  # no request gives up sooner (a child has no second connection)

    def __init__(self) -> None:
        self.epoch = 0
        self.state = "connecting"
        self.problem = False
        self.conn: Connection | None = None
        self.stream = "?"
        self._cpu: Callable[[], float | None] = KhugepagedCpu()

    async def _connect(self) -> Connection:
        raise NotImplementedError

    def _failed(self, why: str) -> SourceError:
        """Count a gap and drop the connection; the error to raise."""
        self.epoch += 1
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.state, self.problem = why, True
        return SourceError(why)

    async def _request(self, req: dict[str, Any], timeout: float = TIMEOUT_S) -> dict[str, Any]:
        if self.conn is None:
            self.conn = await self._connect()
        try:
            return await self.conn.request(req, max(timeout, self.min_timeout))
        except SourceError as e:
            raise self._failed(self._why(e)) from None

    def _why(self, e: SourceError) -> str:
        return str(e)

    async def snapshot(self, pid: int | None = None, step: int | None = None,
                       timeout: float = TIMEOUT_S) -> Frame:
        """The latest snapshot (`pid`: with that process's PMDs; `step`: replay only)."""
        req: dict[str, Any] = {"req": "snapshot", "top": TOP}
        if pid is not None:
            req["pid"] = pid
        if step is not None:
            req["step"] = step
        ans = await self._request(req, timeout)
        if not ans.get("ok"):
            # Not yet a snapshot: a child compiling, a daemon still attaching its probes.
            if ans.get("state") in ("compiling", "starting") or str(
                    ans.get("error", "")).startswith("no snapshot yet"):
                self.state, self.problem = str(ans.get("state") or "starting"), False
                raise NotReady(self.state)
            raise self._failed(f"snapshot refused: {ans.get('error', 'no reason given')}")
        frame = _frame(ans, self.stream, self.epoch, None if self.replay else self._cpu())
        self.problem = False
        self.state = self._live_state(frame)
        return frame

    def _live_state(self, frame: Frame) -> str:
        return "live"

    async def pmd(self, pid: int, address: str) -> dict[str, Any] | None:
        """One PMD's full record, or None when the source holds none."""
        ans = await self._request({"req": "pmd", "pid": pid, "address": address})
        return ans.get("pmd") if ans.get("ok") and isinstance(ans.get("pmd"), dict) else None

    async def aclose(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def shutdown(self, say: Callable[[str], None] = lambda s: None) -> str | None:
        """After the UI has gone: stop what the source started. Returns a line to print
        when the source ended in an error, else None."""
        return None


def _hello_sync(path: Path, timeout: float = CONNECT_TIMEOUT_S) -> dict[str, Any]:
    """Connect to a daemon socket and say hello, blocking (before the UI starts)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(b'{"req": "hello"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    ans = json.loads(buf or b"null")
    if not isinstance(ans, dict) or not ans.get("ok"):
        raise OSError(f"no khmon daemon answers there ({buf[:80]!r})")
    return ans


class DaemonSource(Source):
    """A running `khmon daemon`, through its socket. A daemon that goes away is shown and
    retried at every refresh; one that comes back is a new stream (rates restart)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.label = f"daemon {path}"

    async def _connect(self) -> Connection:
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path), limit=LINE_LIMIT), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as e:
            raise self._failed(f"daemon gone ({getattr(e, 'strerror', None) or e}): "
                               "retrying") from None
        conn = Connection(r, w)
        try:
            hello = await conn.request({"req": "hello"})
            if not hello.get("ok"):
                raise SourceError(f"hello refused: {hello.get('error')}")
        except SourceError as e:
            conn.close()
            raise self._failed(f"daemon not answering ({e}): retrying") from None
        self.stream = f"daemon:{hello.get('pid')}:{hello.get('started')}"
        self.label = f"daemon {self.path} (pid {hello.get('pid', '?')})"
        return conn

    def _why(self, e: SourceError) -> str:
        return f"daemon lost ({e}): retrying"


class ChildSource(Source):
    """A child process (khmon.topfeed) serving the protocol on a socketpair: a capture of
    its own (root, no daemon, or --local) or a replay. Started by start(), before the UI.

    Its requests wait up to CHILD_TIMEOUT_S: the socketpair is its only connection, and
    giving up on an answer closes it, which stops the child. While bcc compiles (Python
    parsing BTF in the same process) an answer can take seconds, and under TCG tens of
    seconds; the screen never waits for it (the poller does)."""

    min_timeout = CHILD_TIMEOUT_S

    def __init__(self, args: list[str], label: str, replay: bool = False,
                 argv0: list[str] | None = None) -> None:
        super().__init__()
        self.args, self.label, self.replay = args, label, replay
        self.argv0 = argv0 or [sys.executable, "-m", "khmon.topfeed"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self._sock: socket.socket | None = None  # until the connection takes it over
        self._own: socket.socket | None = None  # the same socket, to shut down at the end
        self.state = "starting" if replay else "compiling"
        self.dead = False

    def start(self) -> ChildSource:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (read and closed in shutdown)
        try:
            self.proc = subprocess.Popen(
                [*self.argv0, "--fd", str(child.fileno()), *self.args],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self.log,
                # Its own session: a Ctrl-C at the terminal is khmon top's to handle, and
                # the child is stopped in order (probes detached) by shutdown().
                start_new_session=True)
        except OSError as e:
            parent.close()
            raise KhmonError(f"cannot start khmon's capture process: {e.strerror}",
                             "check the installation (python -m khmon.topfeed)", EXIT_FAIL) from e
        finally:
            child.close()
        self._sock = self._own = parent
        self.stream = f"child:{self.proc.pid}"
        return self

    def last_error(self) -> str:
        """The child's last line on stderr (its one-line error), or its exit status."""
        lines: list[str] = []
        if self.log is not None:
            with contextlib.suppress(OSError, ValueError):
                self.log.seek(0)
                lines = [x for x in self.log.read()[-4096:].decode(errors="replace").splitlines()
                         if x.strip()]
        if lines:
            return lines[-1].strip()
        code = self.proc.poll() if self.proc is not None else None
        return f"the capture process exited with status {code}" if code is not None else ""

    async def _connect(self) -> Connection:
        if self._sock is None or self.dead:
            raise SourceError(self.state)
        r, w = await asyncio.open_unix_connection(sock=self._sock, limit=LINE_LIMIT)
        self._sock = None  # the transport owns it now
        return Connection(r, w)

    def _why(self, e: SourceError) -> str:
        if not e.closed and self.proc is not None and self.proc.poll() is None:
            return f"capture process not answering ({e})"
        self.dead = True  # it closed its end of the socket: it is exiting
        return "capture ended: " + (self.last_error() or str(e))

    def _live_state(self, frame: Frame) -> str:
        if self.replay:
            where = f"frame {frame.replay_frame}" if frame.replay_frame else "frame ?"
            return f"replay {where}" + (" (end)" if frame.replay_end else "")
        probes = frame.report.get("probes")
        n = sum(v is None for v in probes.values()) if isinstance(probes, dict) else "?"
        return f"attached to {n} tracepoints"

    def shutdown(self, say: Callable[[str], None] = lambda s: None,
                 wait: float = DETACH_WAIT_S) -> str | None:
        """Stop the child: close its socket (it stops on EOF) and send SIGTERM, then wait
        for its probes to detach, saying so when that takes over a second."""
        if self._own is not None:  # the child stops on EOF, whoever holds the socket now
            with contextlib.suppress(OSError):
                self._own.shutdown(socket.SHUT_RDWR)
            self._own.close()
            self._own = self._sock = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        err = None
        p = self.proc
        if p is not None:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(1.0)
                except subprocess.TimeoutExpired:
                    say("khmon: waiting for the probes to detach ...")
                    try:
                        p.wait(wait)
                    except subprocess.TimeoutExpired:
                        p.kill()  # the kernel frees the programs with the last fd
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            p.wait(2.0)
            if p.returncode not in (0, -signal.SIGTERM, None):
                err = self.last_error() or f"the capture process exited with {p.returncode}"
        if self.log is not None:
            self.log.close()
            self.log = None
        return err


def choose(socket_path: Path | None, local: bool, replay: Path | None, pid: int | None,
           argv0: list[str] | None = None) -> Source:
    """The source the options ask for, or the default: the daemon when one answers on the
    default socket, else a capture of its own when root. A child is started here, before
    the UI, so it compiles while the screen comes up."""
    pid_args = ["-p", str(pid)] if pid else []
    if replay is not None:
        if not replay.is_file():
            raise KhmonError(f"cannot read {replay}: no such file", "give a recording made "
                             "by khmon record -o FILE", 2)
        return ChildSource(["--replay", str(replay)], f"replay {replay}", True,
                           argv0).start()
    if socket_path is not None:
        try:
            _hello_sync(socket_path)
        except (OSError, ValueError) as e:
            raise KhmonError(f"no khmon daemon answers at {socket_path} "
                             f"({getattr(e, 'strerror', None) or e})",
                             "start it with khmon daemon, or leave out --socket", EXIT_FAIL
                             ) from None
        return DaemonSource(socket_path)
    if not local:
        try:
            _hello_sync(DEFAULT_SOCKET)
            return DaemonSource(DEFAULT_SOCKET)
        except (OSError, ValueError):
            pass
    if os.geteuid() != 0:
        raise KhmonError(("no khmon daemon at " + str(DEFAULT_SOCKET) + " and "
                          if not local else "")
                         + "a capture of its own needs root",
                         "start the daemon (khmon daemon), or run as root: sudo khmon top",
                         EXIT_FAIL)
    return ChildSource(["--local", *pid_args], "local capture", False, argv0).start()
