"""khmon top's Textual app, headless (App.run_test and its Pilot), against a fake daemon
socket: keys, sorting, selection, resize to 40x12 and back, a slow source, a source that
dies, hostile names; and the imports each process is allowed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from topdata import frames, hostile

from khmon.outputs.top.app import HelpScreen, Panel, TopApp
from khmon.outputs.top.sources import DaemonSource, NotReady
from khmon.outputs.top.view import GRID, PMDS, PROCESSES
from tests.support.fake_daemon import FakeDaemon, fake_daemon

FRAMES = frames(processes=12)

Body = Callable[[Any, TopApp, FakeDaemon], Awaitable[None]]


def by_seq(seq: int, _req: dict[str, Any]) -> dict[str, Any]:
    return FRAMES[(seq - 1) % len(FRAMES)]


def text(app: TopApp, panel: str) -> str:
    return app.query_one(f"#{panel}", Panel).render().plain


async def until(cond: Callable[[], bool], pilot: Any, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        await pilot.pause(0.05)


def drive(tmp_path: Path, body: Body, report: Callable[[int, dict[str, Any]], dict[str, Any]]
          = by_seq, delay: float = 0.2, size: tuple[int, int] = (160, 50)) -> TopApp:
    """Run the app on a fake daemon until body() returns (or the app exits)."""
    sock = tmp_path / "khmon.sock"

    async def main() -> TopApp:
        with fake_daemon(sock, report) as d:
            app = TopApp(DaemonSource(sock), delay=delay)
            async with app.run_test(size=size) as pilot:
                await until(lambda: app.shown is not None, pilot)
                await body(pilot, app, d)
        return app

    return asyncio.run(main())


@pytest.mark.parametrize("key", ["q", "f10", "ctrl+c"])
def test_quit_keys(tmp_path: Path, key: str) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        await pilot.press(key)
        await pilot.pause(0.2)

    app = drive(tmp_path, body)
    assert app.return_code == 0 and not app.is_running


def test_first_frame_is_drawn(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        await until(lambda: "/s" in text(app, "header"), pilot)  # a second frame: rates
        head = text(app, "header")
        assert "daemon" in head and "(pid 4242)" in head and "live" in head
        assert "12 shown of 12" in text(app, "procs")
        assert "Collapse by order" in text(app, "orders") and "uffd_isolate" in text(app, "waste")
        assert "collapses/s" in text(app, "sparks")
        assert text(app, "pmds").startswith("PMDs of pid")
        await pilot.press("q")

    drive(tmp_path, body)


def test_help_opens_and_any_key_closes(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        for key in ("h", "question_mark"):
            await pilot.press(key)
            await pilot.pause(0.1)
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("x")
            await pilot.pause(0.1)
            assert not isinstance(app.screen, HelpScreen)
        await pilot.press("h")
        await pilot.press("q")  # closes help, does not quit
        await pilot.pause(0.1)
        assert app.is_running and not isinstance(app.screen, HelpScreen)

    drive(tmp_path, body)


def _pids(app: TopApp) -> list[int]:
    return [r.pid for r in app.rows if r.pid]


def test_sort_columns_and_invert(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        assert "sort ATTEMPTS ▼" in text(app, "procs")
        await pilot.press("greater_than_sign")
        assert "sort COLLAPSES" in text(app, "procs")
        await pilot.press(*["less_than_sign"] * 6)
        assert "sort PID ▼" in text(app, "procs")
        assert _pids(app) == sorted(_pids(app), reverse=True)
        await pilot.press("I")
        assert "sort PID ▲" in text(app, "procs")
        assert _pids(app) == sorted(_pids(app))
        first = text(app, "procs").splitlines()[2].split()[0]
        assert first == str(min(_pids(app)))

    drive(tmp_path, body)


def test_filters_by_pid_and_comm(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        pid = _pids(app)[3]
        await pilot.press("p", *str(pid), "enter")
        assert _pids(app) == [pid] and f"pid {pid}" in text(app, "procs")
        await pilot.press("p", "enter")
        assert len(_pids(app)) == 12
        comm = app.rows[0].comm
        await pilot.press("slash", *comm, "enter")
        assert all(comm in r.comm for r in app.rows) and app.view.comm_filter == comm
        await pilot.press("slash", "q", "escape")  # q typed into the prompt, Esc cancels
        assert app.is_running and app.view.comm_filter == comm
        await pilot.press("p", "x", "enter")
        assert "not a number: 'x'" in text(app, "footer")
        await pilot.press("I")
        assert "not a number" not in text(app, "footer")

    drive(tmp_path, body)


def test_selection_enter_escape_and_grid(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        await pilot.press("down", "down")
        sel = app._selected_proc()
        assert sel is not None and sel.key == app.rows[2].key
        await pilot.press("I")  # the order changes, the selection stays on the process
        assert app._selected_proc().key == sel.key  # type: ignore[union-attr]
        await until(lambda: all(p["pid"] == sel.pid for p in app.pmd_rows) and app.pmd_rows,
                    pilot)
        await pilot.press("enter")
        assert app.view.level == PMDS and app.view.pmd_address == app.pmd_rows[0]["address"]
        await pilot.press("down")
        assert app.view.pmd_address == app.pmd_rows[1]["address"]
        assert f"PMD {app.pmd_rows[1]['address']}" in text(app, "grid")
        await pilot.press("enter")
        assert app.view.level == GRID
        assert app.query_one("#bottom").size.height > 12
        await pilot.press("escape", "escape")
        assert app.view.level == PROCESSES
        await pilot.press("end")
        assert app._selected_proc().key == app.rows[-1].key  # type: ignore[union-attr]
        await pilot.press("home", "pagedown")
        assert app.view.selected_index(app.rows) > 0

    drive(tmp_path, body)


def test_freeze_and_delay(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        await pilot.press("z")
        frozen = app.shown.seq  # type: ignore[union-attr]
        await until(lambda: app.latest.seq > frozen + 2, pilot)  # type: ignore[union-attr]
        assert app.shown.seq == frozen and "FROZEN" in text(app, "header")  # type: ignore
        await pilot.press("z")
        assert app.shown is app.latest
        await pilot.press("d", *"2.5", "enter")
        assert app.delay == 2.5
        n = d.seq
        await pilot.pause(1.0)
        assert d.seq <= n + 1

    drive(tmp_path, body)


def test_resize_to_40x12_and_back(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        await pilot.resize_terminal(40, 12)
        await pilot.pause(0.3)
        assert app.is_running and app.size == (40, 12)
        assert not app.query_one("#middle").display and not app.query_one("#waste").display
        assert len(text(app, "procs").splitlines()) <= app.query_one("#procs").size.height
        for w, h in ((20, 5), (1, 1), (300, 100)):
            await pilot.resize_terminal(w, h)
            await pilot.pause(0.1)
        await pilot.resize_terminal(160, 50)
        await pilot.pause(0.3)
        assert app.query_one("#middle").display and app.query_one("#waste").display
        assert "12 shown" in text(app, "procs")

    drive(tmp_path, body)


def test_slow_source_never_blocks_keys(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        d.delay = 3.0
        await pilot.pause(0.5)  # a snapshot request is now waiting on the daemon
        for _ in range(3):
            t0 = time.monotonic()
            await pilot.press("I")
            assert time.monotonic() - t0 < 0.5
        assert app.view.inverted
        await pilot.press("q")

    t0 = time.monotonic()
    app = drive(tmp_path, body)
    assert app.return_code == 0 and time.monotonic() - t0 < 8


class SwallowingSource(DaemonSource):
    """After its first frame, a request that never answers and swallows each cancellation,
    as Python 3.11's asyncio.wait_for can when the answer comes as it is cancelled
    (CPython gh-86296); the poller then carries on as if it had not been cancelled."""

    served = False
    swallowed = 0

    async def snapshot(self, *args: Any, **kw: Any) -> Any:
        if not self.served:
            self.served = True
            return await super().snapshot(*args, **kw)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1
        raise NotReady("compiling")


def test_quit_ends_the_app_when_a_cancellation_is_swallowed(tmp_path: Path) -> None:
    """q must end khmon top even when the poller loses a cancellation: it left khmon top
    running after q in the 7.2 guest, its screen already gone."""
    sock = tmp_path / "khmon.sock"
    source = SwallowingSource(sock)

    async def main() -> TopApp:
        with fake_daemon(sock, by_seq):
            app = TopApp(source, delay=0.2)
            async with app.run_test() as pilot:
                await until(lambda: app.shown is not None, pilot)
                await pilot.pause(0.5)  # the poller now waits on the request that never ends
                await pilot.press("q")
        return app

    done: list[TopApp] = []
    t = threading.Thread(target=lambda: done.append(asyncio.run(main())), daemon=True)
    t.start()
    t.join(20)
    assert done and done[0].return_code == 0, "khmon top still running after q"
    assert source.swallowed >= 1


def test_source_that_dies_is_shown_and_retried(tmp_path: Path) -> None:
    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        d.stop()
        await until(lambda: "daemon" in app.notice and "retrying" in app.notice, pilot)
        assert "retrying" in text(app, "header") and app.is_running
        d.start()
        await until(lambda: not app.notice, pilot)
        await until(lambda: "/s" in text(app, "header"), pilot)
        assert "live" in text(app, "header")

    drive(tmp_path, body)


def test_hostile_names_are_text_not_markup(tmp_path: Path) -> None:
    def report(seq: int, req: dict[str, Any]) -> dict[str, Any]:
        return hostile(by_seq(seq, req))

    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        procs = text(app, "procs")
        assert "[/]" in procs and "[bold red]x[/]" in procs and "\\x1b[2J" in procs
        assert "\x1b" not in procs
        await pilot.press("enter", "enter")
        assert "\x1b" not in text(app, "grid") and "\x1b" not in text(app, "pmds")
        await pilot.resize_terminal(40, 12)
        await pilot.pause(0.2)
        assert app.is_running

    drive(tmp_path, body, report)


def test_snapshot_of_an_unknown_shape_is_na_not_a_crash(tmp_path: Path) -> None:
    def report(seq: int, _req: dict[str, Any]) -> dict[str, Any]:
        return {"processes": [{"pid": "x", "comm": ["a"]}, 5], "collapse": 3, "pmds": {}}

    async def body(pilot: Any, app: TopApp, d: FakeDaemon) -> None:
        await pilot.pause(0.5)
        assert app.is_running and "N/A" in text(app, "header")

    drive(tmp_path, body, report)


def test_count_ends_the_app(tmp_path: Path) -> None:
    sock = tmp_path / "khmon.sock"

    async def main() -> TopApp:
        with fake_daemon(sock, by_seq):
            app = TopApp(DaemonSource(sock), delay=0.1, count=3)
            async with app.run_test() as pilot:
                await until(lambda: not app.is_running, pilot)
        return app

    app = asyncio.run(main())
    assert app.return_code == 0 and app.frames == 3


ROOT = Path(__file__).resolve().parents[2]


def test_imports_per_process() -> None:
    """The UI process never imports bcc; only app.py imports Textual."""
    code = (
        "import sys, asyncio\n"
        "import khmon.cli, khmon.outputs.top.batch, khmon.outputs.top.sources\n"
        "assert 'textual' not in sys.modules, 'textual imported outside the app'\n"
        "from khmon.outputs.top.app import TopApp\n"
        "from khmon.outputs.top.sources import DaemonSource\n"
        "async def go():\n"
        "    app = TopApp(DaemonSource(__import__('pathlib').Path('/nonexistent')))\n"
        "    async with app.run_test() as pilot:\n"
        "        await pilot.pause(0.3)\n"
        "asyncio.run(go())\n"
        "bad = [m for m in sys.modules if m == 'bcc' or m.startswith('bcc.')]\n"
        "assert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
