"""A client of the daemon's socket API (docs/socket.md): `khmon report --daemon`, `khmon top`.

One connection, requests answered in order. Every failure a user can act on (no daemon,
no permission, a daemon that answered with an error) is a KhmonError naming the fix.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from ..errors import KhmonError

DEFAULT_SOCKET = Path("/run/khmon/khmon.sock")


class DaemonClient:
    """Connected to the daemon at `path` until close() (or the end of a with block)."""

    def __init__(self, path: Path = DEFAULT_SOCKET, timeout: float = 10.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as e:
            self._sock.close()
            fix = ("run it as root, or in the khmon group" if isinstance(e, PermissionError)
                   else "start it (systemctl start khmon, or khmon daemon), or give --socket")
            raise KhmonError(f"cannot reach the khmon daemon at {path}: {e.strerror or e}",
                             fix) from e
        self._file = self._sock.makefile("rb")

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send one request; its response (an `ok: false` one raises KhmonError)."""
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
            line = self._file.readline()
        except OSError as e:
            raise KhmonError(f"the khmon daemon at {self.path} did not answer: "
                             f"{e.strerror or e}", "check `journalctl -u khmon`") from e
        if not line:
            raise KhmonError(f"the khmon daemon at {self.path} closed the connection",
                             "check `journalctl -u khmon`")
        resp = json.loads(line)
        if not resp.get("ok"):
            raise KhmonError(f"the khmon daemon refused {req.get('req')!r}: {resp.get('error')}",
                             "see docs/socket.md")
        return resp

    def hello(self) -> dict[str, Any]:
        return self.request({"req": "hello"})

    def snapshot(self, top: int = 20) -> dict[str, Any]:
        return self.request({"req": "snapshot", "top": top})

    def pmd(self, pid: int, address: int) -> dict[str, Any]:
        return self.request({"req": "pmd", "pid": pid, "address": hex(address)})["pmd"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def daemon_report(path: Path = DEFAULT_SOCKET, top: int = 20) -> dict[str, Any]:
    """The daemon's report of its window so far (`khmon report --daemon`): the latest
    snapshot's, whose process and PMD lists hold the `top` most recently active."""
    with DaemonClient(path) as c:
        snap = c.snapshot(top)
    r = snap["report"]
    r["warnings"] = [*r.get("warnings", []),
                     f"from the khmon daemon (snapshot {snap['seq']}): processes and PMDs "
                     f"listed are the {top} most recently active of {snap['processes_total']} "
                     f"and {snap['pmds_total']}"]
    return r
