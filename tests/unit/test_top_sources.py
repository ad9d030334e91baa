"""khmon top's sources: the protocol client against a fake daemon socket (restarts, a daemon
that goes away, slow and garbled answers), the replay child on a real recording, and child
processes that die or take long to detach."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from synthetic import SyntheticStream
from topdata import frames, write_recording

from khmon.errors import KhmonError
from khmon.outputs.top import batch, sources
from khmon.outputs.top.rates import Point, RateKeeper, counters
from khmon.outputs.top.sources import ChildSource, DaemonSource, NotReady, SourceError
from tests.support.fake_daemon import fake_daemon

ROOT = Path(__file__).resolve().parents[2]
FRAMES = frames()


def by_seq(seq: int, _req: dict[str, Any]) -> dict[str, Any]:
    return FRAMES[min(seq, len(FRAMES)) - 1]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def point(f: sources.Frame) -> Point:
    return Point(f.stream, f.epoch, f.seq, f.mono_ns, counters(f.report), f.cpu_s, f.local_s)


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "khmon.sock"


def test_snapshot_hello_and_requests(sock: Path) -> None:
    with fake_daemon(sock, by_seq) as d:
        src = DaemonSource(sock)

        async def go() -> tuple[sources.Frame, sources.Frame]:
            a = await src.snapshot()
            b = await src.snapshot(pid=1003)
            await src.aclose()
            return a, b

        a, b = run(go())
    assert a.stream == f"daemon:4242:{d.started}" and (a.seq, b.seq) == (1, 2)
    assert a.report == FRAMES[0] and a.epoch == 0 and src.state == "live"
    assert src.label == f"daemon {sock} (pid 4242)"
    assert [r["req"] for r in d.requests] == ["hello", "snapshot", "snapshot"]
    assert d.requests[1]["top"] == sources.TOP and d.requests[2]["pid"] == 1003


def test_restart_is_a_new_stream_and_rates_restart(sock: Path) -> None:
    keeper = RateKeeper()
    with fake_daemon(sock, by_seq) as d:
        src = DaemonSource(sock)

        async def go() -> list[Any]:
            out: list[Any] = []
            for i in range(5):
                if i == 2:
                    d.restart()
                try:
                    out.append(keeper.add(point(await src.snapshot())))
                except SourceError as e:
                    out.append(str(e))
            await src.aclose()
            return out

        got = run(go())
    assert got[1]["collapses"] is not None
    assert "daemon lost" in got[2] and "retrying" in got[2]
    assert got[3]["collapses"] is None  # a new daemon: its first snapshot has no rate
    assert got[4]["collapses"] is not None
    assert src.stream.startswith("daemon:4243:")


def test_daemon_gone_is_shown_and_retried(sock: Path) -> None:
    with fake_daemon(sock, by_seq) as d:
        src = DaemonSource(sock)

        async def go() -> list[str]:
            out = []
            await src.snapshot()
            d.stop()
            for _ in range(2):
                with pytest.raises(SourceError) as e:
                    await src.snapshot()
                out.append(str(e.value))
            d.start()
            out.append(str((await src.snapshot()).seq))
            await src.aclose()
            return out

        msgs = run(go())
    assert "daemon" in msgs[0] and "daemon gone" in msgs[1] and "retrying" in msgs[1]
    assert src.problem is False and src.epoch >= 2
    assert msgs[2] == "2"  # the same fake daemon object kept counting


def test_slow_and_garbled_answers_fail_one_refresh(sock: Path) -> None:
    with fake_daemon(sock, by_seq) as d:
        src = DaemonSource(sock)

        async def go() -> list[str]:
            out = []
            await src.snapshot()
            d.delay = 1.0
            t0 = time.monotonic()
            with pytest.raises(SourceError) as e:
                await src.snapshot(timeout=0.3)
            out.append(f"{time.monotonic() - t0:.1f} {e.value}")
            d.delay = 0
            await src.snapshot()  # reconnected (a failure drops the connection)
            d.raw = b"this is not json\n"
            with pytest.raises(SourceError) as e:
                await src.snapshot()
            out.append(str(e.value))
            await src.snapshot()
            d.raw = b'{"ok": true, "seq": "x"}\n'
            with pytest.raises(SourceError) as e:
                await src.snapshot()
            out.append(str(e.value))
            out.append(str((await src.snapshot()).seq > 0))
            await src.aclose()
            return out

        msgs = run(go())
    assert msgs[0].startswith("0.3") and "no answer to snapshot" in msgs[0]
    assert "not JSON" in msgs[1] and "without report or seq" in msgs[2] and msgs[3] == "True"


def test_batch_prints_each_snapshot_once(sock: Path) -> None:
    """A daemon snapshots once a second, so a batch refresh can find the one it printed last:
    it asks again rather than print it twice (the 6.1 guest's `top -b -n 3 --json` printed
    seq 17, 17, 19)."""
    with fake_daemon(sock, by_seq) as d:
        d.repeats = 2
        out, err = io.StringIO(), io.StringIO()
        code = run(batch._loop(DaemonSource(sock), 0.0, 3, True, out, err, asyncio.Event(), [0]))
    assert code == 0 and err.getvalue() == ""
    assert [json.loads(line)["seq"] for line in out.getvalue().splitlines()] == [1, 2, 3]
    assert [r["req"] for r in d.requests].count("snapshot") == 7  # 1, 1, 1, 2, 2, 2, 3


def test_pmd_request_and_not_ready(sock: Path) -> None:
    rec = FRAMES[-1]["pmds"][0]
    with fake_daemon(sock, by_seq) as d:
        d.pmds[(rec["pid"], rec["address"])] = rec
        src = DaemonSource(sock)

        async def go() -> tuple[Any, Any]:
            got = await src.pmd(rec["pid"], rec["address"])
            none = await src.pmd(1, "0x0")
            await src.aclose()
            return got, none

        assert run(go()) == (rec, None)
        d.raw = b'{"ok": false, "error": "no snapshot yet: the daemon is still attaching"}\n'
        src = DaemonSource(sock)

        async def early() -> None:
            try:
                with pytest.raises(NotReady):
                    await src.snapshot()
            finally:
                await src.aclose()

        run(early())
        assert src.problem is False


def test_choose_refuses_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(KhmonError) as e:
        sources.choose(tmp_path / "none.sock", False, None, None)
    assert e.value.exit_code == 1 and "no khmon daemon answers at" in str(e.value)
    with pytest.raises(KhmonError) as e:
        sources.choose(None, False, tmp_path / "missing.khrec", None)
    assert e.value.exit_code == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_not_root_and_no_daemon_is_one_line_and_exit_1() -> None:
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        str(ROOT / ".venv/bin/khmon"), "top", "-b"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and p.stdout == ""
    assert p.stderr.startswith("khmon: error: ") and "needs root" in p.stderr
    assert "sudo khmon top" in p.stderr


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    return write_recording(tmp_path / "run.khrec", SyntheticStream(
        processes=4, pmds_per_process=4, scanned_per_s=100, seconds=5))


def test_replay_child_steps_forward_back_and_ends(recording: Path) -> None:
    src = sources.choose(None, False, recording, None)
    assert isinstance(src, ChildSource) and src.replay

    async def go() -> list[tuple[int | None, int, bool]]:
        out = []
        for step in (1, 1, 1, -1, -1, 0, 99, 1):
            f = await src.snapshot(step=step)
            out.append((f.replay_frame, f.seq, f.replay_end))
        pid = f.report["processes"][0]["pid"]
        f = await src.snapshot(pid=pid, step=0)
        assert f.process_pmds is not None and f.process_pmds["pid"] == pid
        mine = f.process_pmds["pmds"]
        assert mine and {p["pid"] for p in mine} == {pid}
        assert len({p["pid"] for p in f.report["pmds"]}) > 1  # the report's are all recent
        rec = await src.pmd(pid, mine[0]["address"])
        assert rec is not None and rec["address"] == mine[0]["address"]
        await src.aclose()
        return out

    try:
        got = run(go())
    finally:
        assert src.shutdown() is None
    assert [g[0] for g in got] == [1, 2, 3, 2, 1, 1, 6, 6]
    assert got[-1][2] and not got[0][2] and src.state.startswith("replay frame 6")


FAKE_CHILD = textwrap.dedent("""
    import json, signal, socket, sys, time
    mode = sys.argv[1]
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    if mode == "dies":
        time.sleep(0.3)
        print("khmon: error: BPF refused (check khmon doctor)", file=sys.stderr)
        sys.exit(1)
    late = mode.startswith("late")  # answers after 2 s, as a child busy compiling
    signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0 if late else float(mode)),
                                              sys.exit(0)))
    s = socket.socket(fileno=fd)
    f = s.makefile("rb")
    for line in f:
        time.sleep(2 if late else 0)
        s.sendall(json.dumps({"ok": False, "error": "compiling", "state": "compiling"}).encode()
                  + b"\\n")
    time.sleep(60)
""")


def fake_child(tmp_path: Path, mode: str) -> ChildSource:
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    return ChildSource(["--local"], "local capture", argv0=[sys.executable, str(script), mode]
                       ).start()


def test_child_that_dies_says_why(tmp_path: Path) -> None:
    src = fake_child(tmp_path, "dies")

    async def go() -> str:
        for _ in range(50):
            try:
                await src.snapshot()
            except NotReady:
                await asyncio.sleep(0.1)
            except SourceError as e:
                return str(e)
        return "no error"

    msg = run(go())
    assert msg == "capture ended: khmon: error: BPF refused (check khmon doctor)"
    assert src.dead and src.problem
    with pytest.raises(SourceError):
        run(src.snapshot())
    assert src.shutdown() == "khmon: error: BPF refused (check khmon doctor)"


def test_child_compiling_then_slow_detach_waits_and_says_so(tmp_path: Path) -> None:
    src = fake_child(tmp_path, "2.5")
    with pytest.raises(NotReady):
        run(src.snapshot())
    assert src.state == "compiling" and not src.problem
    said: list[str] = []
    t0 = time.monotonic()
    assert src.shutdown(said.append) is None
    took = time.monotonic() - t0
    assert 2.0 < took < 5 and said == ["khmon: waiting for the probes to detach ..."]
    assert src.proc is not None and src.proc.returncode == 0


def test_child_slow_to_answer_is_waited_for_not_dropped(tmp_path: Path) -> None:
    """A child busy compiling answers late; giving up would close its only socket and stop
    it (the 7.2 guest's capture never attached so), so its requests wait."""
    src = fake_child(tmp_path, "late")

    async def go() -> list[str]:
        out = []
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(NotReady):
                await src.snapshot(timeout=0.2)
            out.append(f"{time.monotonic() - t0:.0f}")
        await src.aclose()
        return out

    assert run(go()) == ["2", "2"]
    assert not src.dead and src.epoch == 0
    assert src.shutdown() is None
