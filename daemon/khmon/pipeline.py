"""Run an event stream into the model, and into a recording, on a thread of its own.

Live capture drains the ring buffer, decodes and feeds the model on a worker thread, so the
main thread stays free for signals, progress and output, and a slow reader of the output
can never stall the drain. The worker publishes a snapshot (khmon.model.model.Snapshot) at
every stats part; readers take the latest one, which is immutable. The model itself is
touched by the worker alone until the stream has ended.

Other threads that need the model itself (one PMD's full record, say) hand a function to
call(): the worker runs it between two polls of the ring buffer, so it never sees the model
half-way through a part.

A recording is replayed on the calling thread: there is no ring buffer to keep up with.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from .capture.bpfgen import ProbeConfig
from .capture.live import LiveCapture
from .model.model import TOP, Model, Snapshot, settle
from .stream.parts import END, STATS
from .stream.recording import Reader, Writer

T = TypeVar("T")


class LivePipeline:
    """A live capture running into a model (and a recording) on a worker thread."""

    def __init__(self, cap: LiveCapture, duration: float | None = None, out: Path | None = None,
                 keep: bool = False, snapshot_top: int = TOP, **model_options: Any) -> None:
        """`keep`: leave the compiled programs loaded afterwards (cap.reopen() starts
        another window). `snapshot_top`: the processes and PMDs each snapshot lists (the
        daemon's socket serves up to 200). `model_options`: khmon.model.model.Model's keyword
        options (its caps, exit grace and label budget)."""
        self.cap = cap
        self.duration = duration
        self.keep = keep
        self.snapshot_top = snapshot_top
        self.header = cap.header()
        self.model = Model(self.header, cap.layouts, **model_options)
        self.writer = Writer(out, self.header) if out is not None else None
        self.snapshot: Snapshot | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._calls: queue.SimpleQueue[tuple[Callable[[Model], Any], Future]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="khmon-pipeline", daemon=True)

    @property
    def warnings(self) -> list[str]:
        return [f"could not attach {k}: {v}" for k, v in self.cap.probes.attached.items() if v]

    def start(self) -> LivePipeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the capture: the worker detaches, drains and writes the end part."""
        self._stop.set()

    def call(self, fn: Callable[[Model], T], timeout: float = 5.0) -> T:
        """fn(model) run on the worker between two polls (at most POLL_MS apart); its
        result, or its exception. TimeoutError when the worker is busy or gone."""
        if self.done.is_set():
            raise TimeoutError("the capture has ended")
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut.result(timeout)

    def _between_polls(self) -> bool:
        """Run what other threads asked for; then: should the capture stop?"""
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return self._stop.is_set()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.model))
                except Exception as e:  # handed to the caller
                    fut.set_exception(e)

    def _run(self) -> None:
        try:
            for part, batch in self.cap.stream(self.header, self.duration, self._between_polls,
                                               self.keep):
                self.model.add(part, batch)
                if self.writer is not None:
                    self.writer.add(part)
                if part.kind in (STATS, END):
                    self.snapshot = self.model.snapshot(self.snapshot_top)
                    settle()
        except BaseException as e:  # handed to the main thread by wait()
            self.error = e
        finally:
            if self.writer is not None:
                self.writer.close()
            self.done.set()
            self._between_polls()  # nobody waits on the worker any more

    def wait(self, should_stop: Callable[[], bool] = lambda: False, tick: float = 0.2,
             on_tick: Callable[[LivePipeline], None] | None = None) -> Model:
        """Wait for the stream to end; stop it when should_stop() turns true. Runs on the
        main thread, which is where Python delivers signals. Re-raises the worker's error."""
        while not self.done.wait(tick):
            if should_stop():
                self.stop()
            if on_tick is not None:
                on_tick(self)
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.model


def capture(cfg: ProbeConfig, duration: float | None, out: Path | None = None,
            should_stop: Callable[[], bool] = lambda: False,
            reuse: LiveCapture | None = None, **model_options: Any) -> tuple[Model, list[str]]:
    """A live capture into a model (and a recording when `out` is given), start to end.
    `reuse`: an already compiled LiveCapture (cfg is then ignored) that stays loaded after.
    Returns the model and the warnings (probes that could not attach)."""
    if reuse is not None and reuse.probes.detached:
        reuse.reopen()
    cap = reuse or LiveCapture(cfg)
    run = LivePipeline(cap, duration, out, keep=reuse is not None, **model_options).start()
    return run.wait(should_stop), run.warnings


def replay(reader: Reader, **model_options: Any) -> Model:
    """Feed a recording's parts into a model."""
    model = Model(reader.header, reader.layouts, **model_options)
    for part in reader.parts():
        model.add(part)
    return model
