"""`khmon top`: a live view of khugepaged, from the daemon or a capture of its own.

    sources.py  where snapshots come from: the daemon's socket, a child capture, a replay
    rates.py    rates between two snapshots, N/A across restarts and gaps; history
    view.py     sort, filters, selection and focus; rows and layout, pure
    panels.py   each panel as a pure function of a snapshot to rich Text
    app.py      the Textual app (the only module that imports Textual)
    batch.py    -b and --json output

run() picks the source first (a child starts compiling before any screen), then the
interactive app or batch output, and stops what the source started only after the
terminal is restored.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import EXIT_BAD_INPUT, KhmonError
from . import sources

DEFAULT_DELAY = 1.0


@dataclass(frozen=True)
class TopOptions:
    """The command line's choices (khmon.cli top)."""

    interval: float | None = None  # positional INTERVAL
    count: int | None = None  # positional COUNT
    delay: float | None = None  # -d
    number: int | None = None  # -n
    pid: int = 0
    batch: bool = False
    once: bool = False
    json: bool = False
    socket: Path | None = None
    local: bool = False
    replay: Path | None = None

    def checked(self) -> tuple[float | None, int | None]:
        """(delay or None for the default, count or None for no end); bad combinations
        raise a one-line usage error."""
        if self.interval is not None and self.delay is not None and self.interval != self.delay:
            raise KhmonError("INTERVAL and -d say different things", "give one of them",
                             EXIT_BAD_INPUT)
        if self.count is not None and self.number is not None and self.count != self.number:
            raise KhmonError("COUNT and -n say different things", "give one of them",
                             EXIT_BAD_INPUT)
        if sum((self.socket is not None, self.local, self.replay is not None)) > 1:
            raise KhmonError("--socket, --local and --replay choose one source",
                             "give at most one of them", EXIT_BAD_INPUT)
        count = self.count if self.count is not None else self.number
        return (self.interval if self.interval is not None else self.delay,
                count if count is not None else (1 if self.once else None))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(opts: TopOptions, source: sources.Source | None = None) -> int:
    """khmon top from start to end; the exit status. `source`: one already made (tests),
    instead of the one the options choose."""
    delay, count = opts.checked()
    interactive = not (opts.batch or opts.once or opts.json) and sys.stdout.isatty() \
        and sys.stdin.isatty()
    if source is None:
        source = sources.choose(opts.socket, opts.local, opts.replay, opts.pid or None)
    code = 1
    try:
        if interactive:
            from .app import TopApp

            app = TopApp(source, delay or DEFAULT_DELAY, count, opts.pid or None)
            app.run()
            code = app.return_code if app.return_code is not None else 1
        else:
            from . import batch

            code = batch.run(source, delay, count, opts.json)
    finally:
        # The terminal is restored by now: a slow detach only delays the prompt.
        t0 = time.monotonic()
        err = source.shutdown(_say)
        if time.monotonic() - t0 > 1:
            _say(f"khmon: probes detached in {time.monotonic() - t0:.1f} s")
    if err:
        _say(err if err.startswith("khmon:") else f"khmon: error: {err}")
        return code or 1
    return code
