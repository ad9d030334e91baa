"""The daemon's watchdog pings follow the pipeline worker, not the main thread.

A worker that stops publishing snapshots (stuck draining, deadlocked in the model) while the
main loop still runs must stop the WATCHDOG=1 datagrams, so that systemd restarts the
service; the guests' SIGSTOP test stops the whole process and cannot show this. The pings
arrive on a bound datagram socket, as they would on systemd's notification socket; the
snapshots are a real model's over a synthetic stream; only the clock is the test's.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from synthetic import SyntheticStream

from khmon import daemon
from khmon.capture.bpfgen import ProbeConfig
from khmon.model.model import Model

WATCHDOG_S = 20.0


def _pings(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def test_pings_stop_when_snapshots_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    clock = [1000.0]
    monkeypatch.setattr(daemon.time, "monotonic", lambda: clock[0])
    s = SyntheticStream(processes=2, pmds_per_process=5, scanned_per_s=20, seconds=3)
    model = Model(s.header, s.lays)
    parts = iter(s.parts())
    opts = daemon.Options(("127.0.0.1", 0), None, tmp_path / "sock", None, 1 << 30, 32, 1000)
    d = daemon.Daemon(opts, ProbeConfig())
    pipeline = SimpleNamespace(snapshot=None)

    def tick(seconds: float, publish: bool) -> list[bytes]:
        """The main loop's half-second ticks over `seconds`, the worker publishing a new
        snapshot every second or not at all; the datagrams that came."""
        got = []
        for i in range(int(seconds * 2)):
            clock[0] += 0.5
            if publish and i % 2 == 0:
                model.add(next(parts))
                pipeline.snapshot = model.snapshot()
            d._tick(pipeline)
            got += _pings(sock)
        return [g for g in got if g == b"WATCHDOG=1"]

    try:
        assert len(tick(20, publish=True)) >= 3  # every wd/4 = 5 s while snapshots come
        stalled = tick(30, publish=False)  # the worker stalls; the main loop goes on
        # pings go on only within max(3 s, wd/2) = 10 s of the last snapshot, then stop
        assert len(stalled) <= 2
        assert tick(20, publish=False) == []
        assert len(tick(10, publish=True)) >= 1  # a worker that resumes is pinged for again
    finally:
        d.notify.close()
        sock.close()
