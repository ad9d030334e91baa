"""How a capture is told to stop: SIGINT (Ctrl-C), SIGTERM and SIGHUP all end it cleanly.

A capture that ends cleanly detaches its probes, drains the ring buffer and the kernel's
dedup slots, and writes its end part, so nothing the kernel counted is lost. SIGHUP is one of
them because it is how a closed terminal or a dropped ssh session says goodbye: its default
action would kill the recorder at once, with no end part and no report.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopFlag:
    """Callable: true once one of STOP_SIGNALS arrived (installed when made; main thread)."""

    def __init__(self) -> None:
        self.stop = False
        for sig in STOP_SIGNALS:
            # A signal ignored when khmon started (nohup's SIGHUP, a background job's SIGINT)
            # stays ignored: whoever started khmon asked for that.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._set)

    def _set(self, *_: Any) -> None:
        self.stop = True

    def __call__(self) -> bool:
        return self.stop
