"""The daemon's socket API (khmon.service.api, docs/socket.md) over real Unix sockets,
serving snapshots of a real Model: the requests, their order, and that a client that stops
reading or sends nonsense costs the server nothing but its own connection."""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from synthetic import SyntheticStream

from khmon.errors import KhmonError
from khmon.model.model import Model, Snapshot
from khmon.service.api import MAX_LINE, ApiServer
from khmon.service.client import DaemonClient, daemon_report
from khmon.topfeed import pmds_of


@pytest.fixture(scope="module")
def model() -> Model:
    s = SyntheticStream(processes=30, pmds_per_process=10, scanned_per_s=300, seconds=3, seed=2)
    m = Model(s.header, s.lays)
    for p in s.parts():
        m.add(p)
    return m


@pytest.fixture
def server(tmp_path: Path, model: Model) -> Iterator[ApiServer]:
    snap = model.snapshot()
    gate = threading.Event()
    gate.set()

    def pmd(pid: int, address: int) -> dict | None:
        gate.wait(10)  # as LivePipeline.call waits for the worker
        return model.pmd_json(pid, address)

    srv = ApiServer(tmp_path / "khmon.sock", lambda: snap, pmd, "7.2.13-test", out_cap=64 << 10,
                    process_pmds=lambda pid, n: pmds_of(model, pid, n))
    srv.gate = gate  # type: ignore[attr-defined]
    srv.start()
    yield srv
    srv.stop()


def _conn(srv: ApiServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(srv.path))
    return s


def _lines(s: socket.socket, n: int) -> list[dict]:
    f = s.makefile("rb")
    return [json.loads(f.readline()) for _ in range(n)]


def test_hello_and_snapshot_have_the_report_keys(server: ApiServer, model: Model) -> None:
    with DaemonClient(server.path) as c:
        hello = c.hello()
        assert hello["protocol"] == 1 and hello["kernel"] == "7.2.13-test" and hello["pid"] > 0
        snap = c.snapshot(top=5)
    assert set(snap["report"]) == set(model.report())  # the keys of `khmon report --json`
    assert len(snap["report"]["processes"]) == 5 and len(snap["report"]["pmds"]) == 5
    assert snap["processes_total"] == len(model.processes) and snap["seq"] >= 1
    r = daemon_report(server.path, top=3)
    assert len(r["processes"]) == 3 and "from the khmon daemon" in r["warnings"][-1]
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o660
    p = next(x for x in model.report()["pmds"] if x["attempts"])
    with DaemonClient(server.path) as c:
        assert c.pmd(p["pid"], int(p["address"], 16)) == model.pmd_json(p["pid"],
                                                                         int(p["address"], 16))


def test_pmd_record_and_errors_keep_the_connection(server: ApiServer, model: Model) -> None:
    p = next(r for r in model.report()["pmds"] if r["attempts"])
    s = _conn(server)
    s.sendall(b"not json\n"
              + json.dumps({"req": "pmd", "pid": p["pid"], "address": p["address"]}).encode()
              + b"\n{\"req\": \"pmd\", \"pid\": 1, \"address\": \"0x200000\"}\n"
              + b"{\"req\": \"frobnicate\"}\n[1, 2]\n{\"req\": \"pmd\", \"pid\": \"x\"}\n")
    bad, found, missing, unknown, array, invalid = _lines(s, 6)
    assert bad == {"ok": False, "error": "a request is one JSON object per line"}
    assert found["ok"] and found["pmd"] == model.pmd_json(p["pid"], int(p["address"], 16))
    assert missing == {"ok": False, "error": "no such PMD record"}
    assert not unknown["ok"] and "frobnicate" in unknown["error"]
    assert not array["ok"] and not invalid["ok"]
    s.close()
    assert server.requests["bad"] == 3 and server.requests["pmd"] == 3


def test_answers_keep_request_order_while_a_pmd_waits(server: ApiServer, model: Model) -> None:
    server.gate.clear()  # type: ignore[attr-defined]
    p = model.report()["pmds"][0]
    s = _conn(server)
    s.sendall(json.dumps({"req": "pmd", "pid": p["pid"], "address": p["address"]}).encode()
              + b"\n{\"req\": \"hello\"}\n")
    other = _conn(server)  # served meanwhile
    other.sendall(b'{"req": "hello"}\n')
    assert _lines(other, 1)[0]["ok"]
    server.gate.set()  # type: ignore[attr-defined]
    first, second = _lines(s, 2)
    assert "pmd" in first and second["protocol"] == 1


def test_a_client_that_stops_reading_is_dropped_others_served(server: ApiServer) -> None:
    slow = _conn(server)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(b'{"req": "snapshot", "top": 20}\n' * 400)  # never read
    deadline = time.monotonic() + 10
    while server.disconnects["slow_reader"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.disconnects["slow_reader"] == 1
    with DaemonClient(server.path) as c:
        assert c.hello()["ok"]
    slow.close()


def test_an_endless_line_closes_that_connection(server: ApiServer) -> None:
    s = _conn(server)
    s.sendall(b"x" * (MAX_LINE + 2))
    assert s.recv(10) == b""  # closed
    assert server.disconnects["line_too_long"] == 1


def test_a_live_socket_is_not_taken_a_stale_one_is(tmp_path: Path, server: ApiServer) -> None:
    with pytest.raises(KhmonError, match="another khmon daemon answers"):
        ApiServer(server.path, lambda: None, lambda p, a: None, "k")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # bound, nobody listening: a killed daemon's
    srv = ApiServer(stale, lambda: None, lambda p, a: None, "k").start()
    with DaemonClient(stale) as c, pytest.raises(KhmonError, match="no snapshot yet"):
        c.snapshot()
    s = _conn(srv)
    s.sendall(b'{"req": "snapshot"}\n')
    assert _lines(s, 1)[0]["state"] == "starting"  # what khmon top shows meanwhile
    s.close()
    srv.stop()
    assert not stale.exists()


def test_client_errors_are_one_line_khmon_errors(tmp_path: Path) -> None:
    with pytest.raises(KhmonError, match="cannot reach the khmon daemon") as e:
        DaemonClient(tmp_path / "none.sock")
    assert "systemctl start khmon" in str(e.value)


def test_snapshot_encoded_once_per_seq(server: ApiServer) -> None:
    a = server._snapshot(20)
    assert server._snapshot(20) is a
    snap: Snapshot = server.latest()  # type: ignore[assignment]
    assert json.loads(a)["seq"] == snap.seq


def test_a_bug_answering_one_client_costs_only_that_client(tmp_path: Path,
                                                           model: Model) -> None:
    good = model.snapshot()
    bad = Snapshot(good.seq + 1, good.mono_ns, good.wall,
                   {**good.report, "processes": [{1, 2}]},  # a set: json.dumps fails
                   good.processes_total, good.pmds_total)
    dropped: list[str] = []
    srv = ApiServer(tmp_path / "k.sock", lambda: bad, lambda p, a: None, "k").start()
    srv.on_disconnect = dropped.append
    try:
        s = _conn(srv)
        s.sendall(b'{"req": "snapshot"}\n')
        assert s.recv(10) == b""  # closed
        assert srv.disconnects["error"] == 1 and dropped[0].startswith("error: TypeError")
        with DaemonClient(srv.path) as c:
            assert c.hello()["ok"]
    finally:
        srv.stop()


def test_snapshot_with_a_pid_has_that_process_pmds(server: ApiServer, model: Model) -> None:
    """khmon top's PMD panel for a process that is not among the most recently active."""
    pid = model.report()["processes"][-1]["pid"]
    s = _conn(server)
    s.sendall(json.dumps({"req": "snapshot", "top": 3, "pid": pid}).encode() + b"\n"
              + b'{"req": "snapshot", "pid": "x"}\n')
    ans, bad = _lines(s, 2)
    assert ans["ok"] and ans["process_pmds"]["pid"] == pid
    mine = ans["process_pmds"]["pmds"]
    assert 0 < len(mine) <= 3 and all(p["pid"] == pid for p in mine)
    assert len(ans["report"]["processes"]) == 3
    assert not bad["ok"] and "pid" in bad["error"]
