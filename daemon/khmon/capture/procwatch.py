"""Which processes the stream saw have exited: checked by the capture once a second.

The model forgets an exited process's records (khmon.model.processes); it cannot look at
/proc itself (reading the kernel is the capture's job, and a recording must replay the same),
so the capture notes every owner tgid the decoded records name, checks them at each stats
part, and puts those gone in it (`exited`). Bounded: at most MAX tgids are followed, and at
most CHECKS of them are looked at per stats part, oldest check first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..kernel.proc import start_time
from ..stream.decode import Batch


class ProcessWatch:
    MAX = 16384
    CHECKS = 512

    def __init__(self, started: Callable[[int], int | None] = start_time) -> None:
        self._started = started
        self._seen: OrderedDict[int, int | None] = OrderedDict()  # tgid -> start time
        self.overflow = 0  # tgids no longer followed because MAX were

    def observe(self, batch: Batch) -> None:
        """Note the owners this batch names (one C-level pass over the batch)."""
        if "owner_tgid" not in batch.layout.field_names or batch.layout.mm_field is None:
            return
        for (tgid,) in batch.distinct(("owner_tgid",)):
            if tgid and tgid not in self._seen:
                self._seen[tgid] = self._started(tgid)
                if len(self._seen) > self.MAX:
                    self._seen.popitem(last=False)
                    self.overflow += 1

    def exited(self) -> list[int]:
        """Followed tgids whose process is gone (or is another one now), forgotten."""
        gone = []
        for _ in range(min(self.CHECKS, len(self._seen))):
            tgid, when = next(iter(self._seen.items()))
            now = self._started(tgid)
            if now is None or now != when:
                del self._seen[tgid]
                gone.append(tgid)
            else:
                self._seen.move_to_end(tgid)
        return gone
