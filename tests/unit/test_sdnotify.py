"""sd_notify (khmon.service.sdnotify): the datagrams arrive on a bound socket, as systemd's
own notification socket would receive them, for a path and for an abstract name ('@')."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from khmon.service.sdnotify import Notifier


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound AF_UNIX datagram socket standing where systemd's would, and its NOTIFY_SOCKET."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        addr = str(tmp_path / "notify")
        s.bind(addr)
        env = addr
    else:
        name = f"khmon-test-{os.getpid()}-{id(s)}"
        s.bind("\0" + name)
        env = "@" + name
    s.settimeout(2)
    yield env, s
    s.close()


def test_ready_watchdog_status_stopping_arrive(manager: tuple[str, socket.socket]) -> None:
    env, sock = manager
    n = Notifier({"NOTIFY_SOCKET": env})
    assert n.enabled
    assert n.ready("attached in 1.0 s")
    assert sock.recv(4096) == b"READY=1\nSTATUS=attached in 1.0 s"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("1,234 events/s, 0 lost")
    assert sock.recv(4096) == b"STATUS=1,234 events/s, 0 lost"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    n.close()


def test_no_notify_socket_does_nothing() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_s is None
    assert not n.ready("x") and not n.watchdog()


def test_a_vanished_manager_is_counted_not_fatal(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not n.watchdog()
    assert n.errors == 1


@pytest.mark.parametrize("env, want", [
    ({"WATCHDOG_USEC": "20000000"}, 20.0),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 20.0),
    ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env: dict[str, str], want: float | None) -> None:
    assert Notifier(env).watchdog_s == want
