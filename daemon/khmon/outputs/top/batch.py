"""`khmon top -b` and `--json`: the same snapshots as text blocks or JSON lines, for logs,
pipes and scripts (the default when stdout is not a terminal). Never imports Textual.

Text mode prints, per snapshot, the header, the order and waste tables and the busiest
processes, as plain text (the panels' own formatting, without colour), separated by a
blank line, like `top -b`. JSON mode prints one object per line: the daemon's snapshot
answer (`seq`, `mono_ns`, `wall`, `report`, `processes_total`, `pmds_total`) plus
`source` and `rates` (per second; null for N/A). A replay runs through its frames without
waiting unless an interval was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from typing import IO, Any

from . import panels
from .rates import Point, RateKeeper, counters
from .sources import Frame, NotReady, Source, SourceError
from .view import View, process_rows

BATCH_PROCESSES = 20
READY_POLL_S = 0.25


def text_block(frame: Frame, rates: dict[str, float | None], source: Source,
               width: int) -> str:
    """One snapshot as plain text: header, orders, waste, the first processes."""
    r = frame.report
    status = panels.Status(source.label, source.state)
    view = View()
    rows = view.visible(process_rows(r, rates))[:BATCH_PROCESSES]
    parts = [panels.header(r, rates, status, False, width),
             panels.orders(r, rates, width, 20), panels.waste(r, rates, width, 12),
             panels.processes(rows, frame.processes_total, view, width, len(rows) + 2, 0)[0]]
    return "\n".join(p.plain.rstrip() for p in parts) + "\n"


def json_line(frame: Frame, rates: dict[str, float | None], source: Source) -> str:
    rates_out = {k: v for k, v in rates.items() if "/" not in k}
    obj: dict[str, Any] = {"source": source.label, "stream": frame.stream, "seq": frame.seq,
                           "mono_ns": frame.mono_ns, "wall": frame.wall, "rates": rates_out,
                           "processes_total": frame.processes_total,
                           "pmds_total": frame.pmds_total, "report": frame.report}
    if frame.replay_frame is not None:
        obj["frame"] = frame.replay_frame
    return json.dumps(obj)


async def _run(source: Source, delay: float | None, count: int | None, as_json: bool,
               out: IO[str], err: IO[str]) -> int:
    stop = asyncio.Event()
    code = [0]
    loop = asyncio.get_running_loop()
    for sig, c in ((signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        def handler(c: int = c) -> None:
            code[0] = c
            stop.set()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handler)
    try:
        return await _loop(source, delay, count, as_json, out, err, stop, code)
    finally:
        await source.aclose()


async def _loop(source: Source, delay: float | None, count: int | None, as_json: bool,
                out: IO[str], err: IO[str], stop: asyncio.Event, code: list[int]) -> int:
    keeper = RateKeeper()
    width = shutil.get_terminal_size((160, 50)).columns
    n = 0
    wait = delay if delay is not None else (0.0 if source.replay else 1.0)
    last: tuple[str, int, int] | None = None
    started = time.monotonic()
    while not stop.is_set() and (count is None or n < count):
        try:
            frame = await source.snapshot(step=1 if source.replay else None,
                                          timeout=max(5.0, 2 * wait))
        except NotReady:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), READY_POLL_S)
            continue
        except SourceError as e:
            if getattr(source, "dead", False):
                err.write(f"khmon: error: {e}\n")
                return 1
            err.write(f"khmon: {e}\n")
            keeper.gap()
        else:
            if not source.replay and (frame.stream, frame.epoch, frame.seq) == last:
                # The daemon has made no snapshot since the last line (it makes one a
                # second): ask again soon rather than print the same one twice.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), READY_POLL_S)
                continue
            last = (frame.stream, frame.epoch, frame.seq)
            rates = keeper.add(Point(frame.stream, frame.epoch, frame.seq, frame.mono_ns,
                                     counters(frame.report), frame.cpu_s, frame.local_s))
            out.write((json_line(frame, rates, source) + "\n") if as_json
                      else text_block(frame, rates, source, width) + "\n")
            out.flush()
            n += 1
            if frame.replay_end:
                break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, wait - (time.monotonic() - started)))
        started = time.monotonic()
    return code[0]


def run(source: Source, delay: float | None, count: int | None, as_json: bool) -> int:
    """Print `count` snapshots (None: until a signal), `delay` seconds apart."""
    try:
        return asyncio.run(_run(source, delay, count, as_json, sys.stdout, sys.stderr))
    except BrokenPipeError:  # `khmon top -b | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
