"""sd_notify(3) without libsystemd: a few datagrams to the socket systemd names.

systemd documents the protocol as stable (sd_notify(3), "Interface Portability and
Stability"): newline-separated KEY=VALUE assignments in one datagram to the AF_UNIX socket
in $NOTIFY_SOCKET, a path or, when it starts with '@', an abstract socket name. khmon sends
READY=1 once its probes are attached, WATCHDOG=1 while its pipeline drains, STATUS= lines
for `systemctl status`, and STOPPING=1 when it is told to stop. Outside systemd (no
$NOTIFY_SOCKET) every call does nothing, so the daemon runs the same by hand.

A pure-Python client rather than python3-systemd: one more Debian package to link into
the venv for six lines of socket code.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """The service manager's notification socket, if there is one."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # '@name' is an abstract socket: the name begins with a NUL byte on the wire.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_s = _watchdog_seconds(env)
        self.errors = 0  # datagrams the manager refused (it went away, say): counted, not fatal
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send KEY=VALUE lines in one datagram (notify(READY=1, STATUS="...")); True if sent."""
        if self._sock is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            self._sock.sendto(msg.encode(), self.address)
        except OSError:
            self.errors += 1
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: dict[str, str] | os._Environ[str]) -> float | None:
    """WatchdogSec= of the unit, as systemd passes it (WATCHDOG_USEC, meant for WATCHDOG_PID
    alone when that is set: a child must not ping for its parent); None when not armed."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6
