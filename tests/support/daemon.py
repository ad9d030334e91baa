"""The real `khmon daemon` for tests: started on a free 127.0.0.1 port with a temp socket,
ready when it is attached and its endpoint answers, stopped with SIGTERM and a clean exit.

    with running_daemon("--max-process-labels", "4") as d:
        text = d.metrics()                     # GET /metrics (text format)
        snap = d.request({"req": "snapshot"})  # one socket API request
        with Prometheus([d.address]) as prom: ...

The daemon is this checkout's `.venv/bin/khmon daemon`, a process of its own (as systemd
runs it), never an in-process stand-in. It needs root and BPF like every live test. Ready
means: the first snapshot is published (khmon_snapshot_timestamp_seconds is in the
exposition: the probes are attached and the pipeline runs) and the socket answers hello.
A daemon that exits or is not ready in time fails the test with its stderr. On leaving the
block the daemon gets SIGTERM and must exit 0 within `stop_timeout` seconds (compiling and
detaching take far longer in a TCG guest: the defaults follow KHMON_TCG_GUEST).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket as socketlib
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.live import UNDER_TCG

ROOT = Path(__file__).resolve().parents[2]
KHMON = ROOT / ".venv" / "bin" / "khmon"
READY_TIMEOUT = 300.0 if UNDER_TCG else 60.0  # a bcc compile: ~0.5 s on the host, 30-75 s in TCG
STOP_TIMEOUT = 60.0 if UNDER_TCG else 10.0
# Options the environment could set behind a test's back (the daemon reads KHMON_LISTEN ...).
DAEMON_ENV = ("KHMON_LISTEN", "KHMON_TLS_CERT", "KHMON_TLS_KEY", "KHMON_SOCKET",
              "KHMON_RECORD_DIR", "KHMON_RECORD_MAX_BYTES", "KHMON_PID",
              "KHMON_MAX_PROCESS_LABELS", "KHMON_MAX_PMDS", "KHMON_RINGBUF_PAGES",
              "KHMON_DEDUP_SLOTS")


class DaemonError(AssertionError):
    """The daemon did not start, was not ready in time, or did not stop cleanly."""


@dataclass
class DaemonHandle:
    """A running daemon: where it listens, and what it said."""

    proc: subprocess.Popen[bytes]
    address: str  # host:port of the metrics endpoint
    socket: Path
    scheme: str = "http"
    stderr_path: Path = field(default_factory=Path)
    ca_file: str | None = None  # for https: the certificate to trust

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}/metrics"

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def metrics(self, accept: str | None = None, timeout: float = 10.0) -> str:
        """GET the endpoint; `accept` picks the format (e.g. OpenMetrics)."""
        req = urllib.request.Request(self.url, headers={"Accept": accept} if accept else {})
        ctx = ssl.create_default_context(cafile=self.ca_file) if self.scheme == "https" else None
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return r.read().decode()

    def request(self, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One socket API request on a fresh connection; the response object."""
        with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket))
            s.sendall(json.dumps(req).encode() + b"\n")
            with s.makefile("rb") as f:
                return json.loads(f.readline())


def _free_port() -> int:
    with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(h: DaemonHandle) -> bool:
    try:
        if "khmon_snapshot_timestamp_seconds" not in h.metrics(timeout=5):
            return False
        return bool(h.request({"req": "hello"}, timeout=5).get("ok"))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def running_daemon(*args: str, listen: str | None = None, socket: str | Path | None = None,
                   record_dir: str | Path | None = None, env: dict[str, str] | None = None,
                   ready_timeout: float = READY_TIMEOUT, stop_timeout: float = STOP_TIMEOUT,
                   ca_file: str | None = None) -> Iterator[DaemonHandle]:
    """Start `khmon daemon *args` and yield its handle once ready; SIGTERM it on exit and
    assert it exited 0. `listen` defaults to a free 127.0.0.1 port, `socket` to a path in a
    temp dir; `record_dir` turns the flight recorder on; `env` adds to the environment.
    With --tls-cert in args the endpoint is https (pass `ca_file` to verify it)."""
    with tempfile.TemporaryDirectory(prefix="khmon-daemon-") as tmp:
        sock = Path(socket) if socket is not None else Path(tmp) / "khmon.sock"
        address = listen or f"127.0.0.1:{_free_port()}"
        cmd = [str(KHMON), "daemon", "--listen", address, "--socket", str(sock), *args]
        if record_dir is not None:
            cmd += ["--record-dir", str(record_dir)]
        full_env = {k: v for k, v in os.environ.items()
                    if k not in DAEMON_ENV and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        full_env.update(env or {})
        err_path = Path(tmp) / "stderr"
        with err_path.open("wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err,
                                    stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        h = DaemonHandle(proc, address, sock, "https" if "--tls-cert" in args else "http",
                         err_path, ca_file)
        try:
            deadline = time.monotonic() + ready_timeout
            while not _ready(h):
                if proc.poll() is not None:
                    raise DaemonError(f"khmon daemon exited with {proc.returncode} before it "
                                      f"was ready; stderr:\n{h.stderr_text()}")
                if time.monotonic() > deadline:
                    raise DaemonError(f"khmon daemon not ready after {ready_timeout:.0f} s; "
                                      f"stderr:\n{h.stderr_text()}")
                time.sleep(0.2)
            yield h
        finally:
            rc = _stop(proc, stop_timeout)
        if rc != 0:
            raise DaemonError(f"khmon daemon exited with {rc} after SIGTERM (want 0 within "
                              f"{stop_timeout:.0f} s); stderr:\n{h.stderr_text()}")


def bpf_programs_of(pid: int) -> set[int]:
    """The ids of the BPF programs a process holds open, from its fds' fdinfo (Debian's
    bpftool 7.1 is built without the pid iterator that would list them), so a test can check
    that they are gone from `bpftool prog show` once the process is."""
    ids: set[int] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        ids |= {int(x.split()[1]) for x in info.splitlines() if x.startswith("prog_id:")}
    return ids


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM and wait; SIGKILL after `timeout` (then the exit status says so: -9)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
