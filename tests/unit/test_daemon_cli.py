"""`khmon daemon` option checks and the failures that come before any compile (a taken
port, a socket another daemon answers on), run as processes: exit 2 for bad options, 1 for
the environment, one line each, no traceback. The running daemon is tested live
(tests/daemon, tests/systemd)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from khcli import KHMON, khmon
from khcli import one_error_line as _one_error_line

from khmon.daemon import parse_listen, parse_size
from khmon.errors import KhmonError


@pytest.mark.parametrize("args, why", [
    (["--listen", "localhost:10464"], "is not ADDR:PORT"),
    (["--listen", "127.0.0.1"], "is not ADDR:PORT"),
    (["--listen", "127.0.0.1:99999"], "is not ADDR:PORT"),
    (["--tls-cert", "/etc/hostname"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/etc/hostname"], "no such file"),
    (["--record-dir", "/tmp/x", "--record-max-bytes", "lots"], "is not a size"),
    (["--record-dir", "/tmp/x", "--record-max-bytes", "1M"], "is below 8M"),
    (["--ringbuf-pages", "1000"], "is not a power of two"),
    (["--max-process-labels", "0"], "--max-process-labels"),
])
def test_bad_options_exit_2(args: list[str], why: str) -> None:
    p = khmon("daemon", *args)
    assert p.returncode == 2, p.stderr
    assert why in _one_error_line(p)


def test_options_come_from_the_environment_too() -> None:
    p = subprocess.run([*KHMON, "daemon"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "KHMON_LISTEN": "nowhere"}, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "--listen 'nowhere' is not ADDR:PORT" in _one_error_line(p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_taken_port_fails_before_compiling(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = khmon("daemon", "--listen", f"127.0.0.1:{port}", "--socket", tmp_path / "k.sock")
    assert p.returncode == 1
    line = _one_error_line(p)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "choose another --listen" in line


def test_a_socket_another_daemon_answers_on_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "k.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        p = khmon("daemon", "--listen", f"127.0.0.1:{_free_port()}", "--socket", path)
    assert p.returncode == 1
    assert "another khmon daemon answers on" in _one_error_line(p)


def test_report_from_a_daemon_that_is_not_there(tmp_path: Path) -> None:
    p = khmon("report", "--daemon", "--socket", tmp_path / "none.sock")
    assert p.returncode == 1
    assert "cannot reach the khmon daemon" in _one_error_line(p)


@pytest.mark.parametrize("text, want", [("127.0.0.1:10464", ("127.0.0.1", 10464)),
                                        ("0.0.0.0:1", ("0.0.0.0", 1)),
                                        ("[::1]:10464", ("::1", 10464))])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text, want", [("1G", 1 << 30), ("512M", 512 << 20), ("64k", 64 << 10),
                                        ("1073741824", 1 << 30), ("2GiB", 2 << 30)])
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want
    with pytest.raises(KhmonError):
        parse_size("1.5G")
