"""The interactive `khmon top`: a Textual app that draws snapshots and never waits on them.

The only module of khmon that imports Textual. It holds no numbers of its own: a poller
task asks the source for a snapshot every `delay` seconds (with a timeout), the rates keeper
turns consecutive snapshots into rates, and each panel is a widget whose render() calls one
pure function of khmon.outputs.top.panels with the latest snapshot and its own size. So a
resize redraws from the same snapshot, a slow source delays only the next snapshot, and a
failed refresh becomes a line in the header and a retry.

Terminal safety: q, F10 and Ctrl-C quit through Textual, which restores the terminal;
SIGTERM, SIGHUP and SIGINT do the same (Textual alone would leave a raw terminal on
SIGTERM). Whatever a source started is stopped only after the app has returned, so a slow
detach never holds a raw terminal (khmon.outputs.top.run).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.events import Key, Resize
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Input, Static

from ..escape import printable
from . import panels
from .rates import Point, RateKeeper, counters, dig
from .sources import Frame, NotReady, Source, SourceError
from .view import GRID, PMDS, PROCESSES, ProcRow, View, layout, pmds_of, process_rows

MIN_DELAY, MAX_DELAY = 0.1, 3600.0


class Panel(Widget):
    """A region drawn by one formatting function of its size; a function that fails draws
    its error instead of ending the app."""

    DEFAULT_CSS = "Panel { overflow: hidden; }"

    def __init__(self, draw: Callable[[int, int], Text], **kw: Any) -> None:
        super().__init__(**kw)
        self._draw = draw

    def render(self) -> Text:
        w, h = self.size.width, self.size.height
        if w <= 0 or h <= 0:
            return Text()
        try:
            return self._draw(w, h)
        except Exception as e:  # a snapshot shape the panels did not expect: show it, go on
            return Text(printable(f"N/A (cannot draw: {type(e).__name__}: {e})"), style="red")


class HelpScreen(ModalScreen[None]):
    """The keys; any key closes it (Ctrl-C and F10 still quit)."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: auto; max-width: 100%; height: auto; max-height: 100%;
                          border: round $accent; padding: 0 1; background: $surface; }
    """

    def compose(self) -> ComposeResult:
        yield Static(panels.help_text())

    def on_key(self, event: Key) -> None:
        if event.key not in ("ctrl+c", "f10"):
            event.stop()
            self.dismiss()


class TopScreen(Screen[None]):
    """The one screen: the panels, laid out again whenever the terminal's size changes
    (the app does not see resizes itself; its screen does)."""

    def compose(self) -> ComposeResult:
        app = self.app
        assert isinstance(app, TopApp)
        yield Panel(app._draw_header, id="header")
        yield Panel(app._draw_sparks, id="sparks")
        with Horizontal(id="middle"):
            yield Panel(app._draw_orders, id="orders")
            yield Panel(app._draw_waste, id="waste")
        yield Panel(app._draw_procs, id="procs")
        with Horizontal(id="bottom"):
            yield Panel(app._draw_pmds, id="pmds")
            yield Panel(app._draw_grid, id="grid")
        yield Panel(app._draw_footer, id="footer")
        yield Input(id="prompt", compact=True)

    def on_mount(self) -> None:
        app = self.app
        assert isinstance(app, TopApp)
        app._relayout(self.size.width, self.size.height)

    def on_resize(self, event: Resize) -> None:
        app = self.app
        assert isinstance(app, TopApp)
        app._relayout(event.size.width, event.size.height)


class TopApp(App[int]):
    """khmon top on a terminal."""

    AUTO_FOCUS = None  # the prompt is the only focusable widget, and only while shown
    CSS = """
    Screen { overflow: hidden; }
    #header { height: 3; }
    #sparks { height: 3; }
    #middle, #bottom { height: 12; }
    #orders, #pmds { width: 1fr; }
    #waste { width: 60; margin-left: 1; }
    #grid { width: 70; margin-left: 1; }
    #procs { height: 1fr; }
    #footer { height: 1; }
    #prompt { dock: bottom; height: 1; border: none; padding: 0; display: none; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit_top", show=False),
        Binding("f10", "quit_top", show=False, priority=True),
        Binding("ctrl+c", "quit_top", show=False, priority=True),
        Binding("h,question_mark,f1", "help", show=False),
        Binding("less_than_sign", "sort(-1)", show=False),
        Binding("greater_than_sign", "sort(1)", show=False),
        Binding("I", "invert", show=False),
        Binding("p", "prompt('pid')", show=False),
        Binding("slash", "prompt('comm')", show=False),
        Binding("d", "prompt('delay')", show=False),
        Binding("z", "freeze", show=False),
        Binding("enter", "enter", show=False),
        Binding("escape", "leave", show=False),
        Binding("up", "move(-1)", show=False),
        Binding("down", "move(1)", show=False),
        Binding("pageup", "page(-1)", show=False),
        Binding("pagedown", "page(1)", show=False),
        Binding("home", "move(-1000000)", show=False),
        Binding("end", "move(1000000)", show=False),
        Binding("space", "pause", show=False),
        Binding("left_square_bracket", "step(-1)", show=False),
        Binding("right_square_bracket", "step(1)", show=False),
    ]

    def __init__(self, source: Source, delay: float = 1.0, count: int | None = None,
                 pid: int | None = None) -> None:
        super().__init__()
        self.source = source
        self.delay = delay
        self.count = count
        self.view = View(pid_filter=pid)
        self.keeper = RateKeeper()
        self.latest: Frame | None = None
        self.shown: Frame | None = None  # the frame on screen (older than latest when frozen)
        self.rates: dict[str, float | None] = {}
        self.rows: list[ProcRow] = []
        self.pmd_rows: list[dict[str, Any]] = []
        self.pmd_record: dict[str, Any] | None = None  # the selected PMD, fullest copy known
        self.notice = ""  # the last failed refresh, until one succeeds
        self.hint = ""  # an answer to the last key (a bad number), until the next key
        self.frames = 0
        self.playing = True
        self._steps = 0  # replay steps asked for by [ and ]
        self._wake = asyncio.Event()
        self._stopping = False  # unmounting: the poller ends at its next turn
        self._refetch = False  # the next fetch is for the selection, not the next frame
        self._need = 0  # rows the order table wanted at the last layout
        self._prompt: str | None = None
        self._tops = {"procs": 0, "pmds": 0}

    # --- layout --------------------------------------------------------------------------

    def get_default_screen(self) -> Screen[None]:
        return TopScreen()

    def on_mount(self) -> None:
        loop = asyncio.get_running_loop()
        for sig, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, lambda c=code: self.exit(return_code=c))
        self._poller = asyncio.create_task(self._poll())

    def _middle_need(self) -> int:
        by_order = dig(self.shown.report if self.shown else {}, "collapse", "by_order")
        n = len(by_order) if isinstance(by_order, dict) else 1
        return max(8, min(14, n + 4))

    def _relayout(self, width: int | None = None, height: int | None = None) -> None:
        screen = self._main()  # under the help screen when that is open
        if screen is None:
            return
        rows = layout(width if width is not None else screen.size.width,
                      height if height is not None else screen.size.height, self.view.level,
                      self._middle_need())
        for name in ("header", "sparks", "middle", "bottom", "procs", "footer"):
            w = screen.query_one(f"#{name}")
            w.display = rows[name] > 0
            if rows[name]:
                w.styles.height = rows[name]
        screen.query_one("#waste").display = bool(rows["waste"])
        self._redraw()

    def _main(self) -> TopScreen | None:
        return next((s for s in self.screen_stack if isinstance(s, TopScreen)), None)

    def _redraw(self) -> None:
        screen = self._main()
        if screen is not None:
            for w in screen.query(Panel):
                w.refresh()

    # --- data ------------------------------------------------------------------------------

    async def _poll(self) -> None:
        """Refresh every `delay` seconds; never raises (a failure is a notice and a retry)."""
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._refresh_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a source bug must not end the screen: show it, retry
                self.notice = printable(f"refresh failed: {type(e).__name__}: {e}")
                self.keeper.gap()
                self._redraw()
            if self.count is not None and self.frames >= self.count:
                self.exit(0)
                return
            wait = max(0.0, self.delay - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def _refresh_once(self) -> None:
        step = None
        if self.source.replay:
            step = self._steps + (1 if self.playing and not self._refetch else 0)
            self._steps = 0
        self._refetch = False
        pid = self._selected_pid()
        try:
            frame = await self.source.snapshot(pid=pid, step=step,
                                               timeout=max(2.0, 2 * self.delay))
        except NotReady:
            self._redraw()
            return
        except SourceError as e:
            self.notice = str(e)
            self.keeper.gap()
            self._redraw()
            return
        self.notice = ""
        self.latest = frame
        self.frames += 1
        rates = self.keeper.add(Point(frame.stream, frame.epoch, frame.seq, frame.mono_ns,
                                      counters(frame.report), frame.cpu_s, frame.local_s))
        if not self.view.frozen:
            self.shown, self.rates = frame, rates
            need = self._middle_need()
            self._derive()
            if need != self._need:
                self._need = need
                self._relayout()
            if self._selected_pid() != pid:  # the rows moved: ask for this one's PMDs now
                self._refetch_now()
        await self._fetch_pmd()
        self._redraw()

    def _refetch_now(self) -> None:
        """Fetch again at once (the same replay frame), for the selected process's PMDs."""
        self._refetch = True
        self._wake.set()

    async def _fetch_pmd(self) -> None:
        """The selected PMD's full record when the snapshot does not hold it any more."""
        addr, pid = self.view.pmd_address, self._selected_pid()
        if self.view.level < PMDS or addr is None or pid is None:
            return
        if any(p.get("address") == addr for p in self.pmd_rows):
            return
        with contextlib.suppress(SourceError):
            rec = await self.source.pmd(pid, addr)
            if rec is not None:
                self.pmd_record = rec

    def _derive(self) -> None:
        """Rows from the shown frame and the view: once per frame or view change."""
        if self.shown is None:
            return
        self.rows = self.view.visible(process_rows(self.shown.report, self.rates))
        proc = self._selected_proc()
        self.pmd_rows = pmds_of(self.shown.report, proc.pid if proc else None,
                                self.shown.process_pmds)
        addrs = [p.get("address") for p in self.pmd_rows]
        if self.view.pmd_address in addrs:
            self.pmd_record = self.pmd_rows[addrs.index(self.view.pmd_address)]
        elif self.view.pmd_address is None or (self.pmd_record or {}).get("pid") != (
                proc.pid if proc else None):
            self.pmd_record = self.pmd_rows[0] if self.pmd_rows else None
            if self.view.level >= PMDS and self.pmd_record is not None:
                self.view.pmd_address = self.pmd_record.get("address")

    def _selected_proc(self) -> ProcRow | None:
        i = self.view.selected_index(self.rows)
        return self.rows[i] if i is not None else None

    def _selected_pid(self) -> int | None:
        proc = self._selected_proc()
        if proc is not None:
            return proc.pid
        return self.view.proc_key[0] if self.view.proc_key else None

    # --- drawing -------------------------------------------------------------------------

    def _status(self) -> panels.Status:
        src = self.source
        state = src.state
        if src.replay and not self.playing:
            state += " (paused: space)"
        return panels.Status(src.label, state, src.problem, self.notice)

    def _report(self) -> dict[str, Any]:
        return self.shown.report if self.shown is not None else {}

    def _draw_header(self, w: int, h: int) -> Text:
        return panels.header(self.shown.report if self.shown else None, self.rates,
                             self._status(), self.view.frozen, w)

    def _draw_sparks(self, w: int, h: int) -> Text:
        return panels.sparklines(self.keeper.history, w, h)

    def _draw_orders(self, w: int, h: int) -> Text:
        return panels.orders(self._report(), self.rates, w, h)

    def _draw_waste(self, w: int, h: int) -> Text:
        return panels.waste(self._report(), self.rates, w, h)

    def _draw_procs(self, w: int, h: int) -> Text:
        total = self.shown.processes_total if self.shown else None
        text, self._tops["procs"] = panels.processes(self.rows, total, self.view, w, h,
                                                     self._tops["procs"])
        return text

    def _draw_pmds(self, w: int, h: int) -> Text:
        text, self._tops["pmds"] = panels.pmd_list(self.pmd_rows, self._selected_proc(),
                                                   self.view, w, h, self._tops["pmds"])
        return text

    def _draw_grid(self, w: int, h: int) -> Text:
        return panels.grid(self.pmd_record, self.view, w, h)

    def _draw_footer(self, w: int, h: int) -> Text:
        return panels.footer(self.view.level, self.source.replay, w, self.hint)

    # --- keys ------------------------------------------------------------------------------

    def _changed(self) -> None:
        self._derive()
        self._redraw()

    def action_quit_top(self) -> None:
        self.exit(0)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_sort(self, step: int) -> None:
        self.view.shift_sort(step)
        self._changed()

    def action_invert(self) -> None:
        self.view.inverted = not self.view.inverted
        self._changed()

    def action_freeze(self) -> None:
        self.view.frozen = not self.view.frozen
        if not self.view.frozen and self.latest is not None:
            self.shown = self.latest
            self.rates = self.keeper.add(Point(self.latest.stream, self.latest.epoch,
                                               self.latest.seq, self.latest.mono_ns,
                                               counters(self.latest.report), self.latest.cpu_s,
                                               self.latest.local_s))
        self._changed()

    def action_move(self, step: int) -> None:
        if self.view.level == PROCESSES:
            self.view.move(self.rows, step)
            self._changed()
            self._refetch_now()  # the new process's PMDs
        else:
            self.view.move_pmd(self.pmd_rows, step)
            self._changed()

    def action_page(self, sign: int) -> None:
        procs = self.query_one("#procs").size.height - 2
        pmds = self.query_one("#pmds").size.height - 2
        self.action_move(sign * max(1, procs if self.view.level == PROCESSES else pmds))

    def action_enter(self) -> None:
        if self.view.level == PROCESSES and self._selected_proc() is not None:
            self.view.proc_key = self._selected_proc().key  # type: ignore[union-attr]
            self.view.level = PMDS
            if self.view.pmd_address is None and self.pmd_rows:
                self.view.pmd_address = self.pmd_rows[0].get("address")
        elif self.view.level == PMDS and self.pmd_record is not None:
            self.view.level = GRID
        self._relayout()
        self._changed()

    def action_leave(self) -> None:
        if self.view.level > PROCESSES:
            self.view.level -= 1
            self._relayout()
            self._changed()

    def action_pause(self) -> None:
        if self.source.replay:
            self.playing = not self.playing
            self._redraw()

    def action_step(self, n: int) -> None:
        if self.source.replay:
            self.playing = False
            self._steps += n
            self._wake.set()

    # --- prompts (p, /, d) -------------------------------------------------------------------

    _ours: ClassVar[frozenset[str]] = frozenset(
        b.action.split("(")[0] for b in BINDINGS if isinstance(b, Binding))

    PROMPTS: ClassVar[dict[str, str]] = {
        "pid": "show pid (empty: all): ", "comm": "show comms containing (empty: all): ",
        "delay": "delay in seconds: "}

    def action_prompt(self, what: str) -> None:
        box = self.query_one("#prompt", Input)
        self._prompt = what
        box.placeholder = self.PROMPTS[what]
        box.value = ""
        box.display = True
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        what, value = self._prompt, event.value.strip()
        self._close_prompt()
        try:
            if what == "pid":
                self.view.pid_filter = int(value) if value else None
            elif what == "comm":
                self.view.comm_filter = value or None
            elif what == "delay" and value:
                self.delay = min(MAX_DELAY, max(MIN_DELAY, float(value)))
                self._wake.set()
        except ValueError:
            self.hint = f"not a number: {value!r}"
        self._changed()

    def _close_prompt(self) -> None:
        box = self.query_one("#prompt", Input)
        box.display = False
        self._prompt = None
        self.set_focus(None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While a prompt is open only quitting is a key of its own: the rest is typing."""
        return self._prompt is None or action == "quit_top" or action not in self._ours

    def on_key(self, event: Key) -> None:
        if self.hint and self._prompt is None:
            self.hint = ""
            self._redraw()
        if self._prompt is None:
            return
        box = self.query_one("#prompt", Input)
        if event.key != "escape" and box.has_focus:
            return  # the prompt's own: typing, and Enter to submit
        event.stop()
        event.prevent_default()
        if event.key == "escape":
            self._close_prompt()
        else:  # typed before the prompt took focus: give it the key
            if event.key == "enter":
                self.post_message(Input.Submitted(box, box.value))
            elif event.key == "backspace":
                box.value = box.value[:-1]
            elif event.is_printable and event.character:
                box.insert_text_at_cursor(event.character)

    async def on_unmount(self) -> None:
        self._stopping = True
        task = getattr(self, "_poller", None)
        # Cancel until the poller is done: Python 3.11's asyncio.wait_for can swallow a
        # cancellation that arrives as the result it waits for does (CPython gh-86296), and
        # one lost cancellation left khmon top running after q, its screen already gone.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: a poller bug must not print at exit
        with contextlib.suppress(Exception):
            await self.source.aclose()
