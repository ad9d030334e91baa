"""The processes whose memory khugepaged works on, bounded and forgetting the dead.

A process is keyed by (mm, owner tgid): the mm address alone is recycled by the slab
allocator, so a new process can get a dead one's mm; with the tgid in the key it starts a
record of its own. Seeing an mm under a new owner also tells that the old owner's mm is gone,
so that record is marked exited on the spot. Exits also arrive in stats parts (the capture
checks the tgids it saw). An exited process is kept for `exit_grace_ns` of stream time (a
live view still shows it for a while; None keeps it until the cap pushes it out, as a report
of one window wants) and then forgotten with its PMD records. Beyond `cap` processes the
least recently active one is forgotten. Both are counted.

Per-comm totals, for exporters that must not label by pid: each process counts under the
comm it had when first seen (a rename does not move its history), and a comm that got a row
keeps it; past the label budget new comms count under "other". A forgotten process's counts
stay in its row, so every per-comm total only grows.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

from ..stream.decode import comm as decode_comm
from .records import Cost, ProcessRecord

DEFAULT_CAP = 16384
DEFAULT_LABELS = 32
OTHER = "other"
UNKNOWN = "(owner unknown)"
_COUNTS = ("scans", "collapse_attempts", "collapses", "uffd_attempts")


class CommLabels:
    """Which per-comm row a new process counts under: its comm while the budget lasts."""

    def __init__(self, budget: int = DEFAULT_LABELS) -> None:
        self.budget = budget
        self.rows: set[str] = set()
        self._folded: OrderedDict[str, None] = OrderedDict()  # comms sent to OTHER, recent
        self.overflow = 0  # distinct comms counted under OTHER (see _folded's bound)

    def label(self, comm: str, pid: int) -> str:
        if not pid:
            return UNKNOWN
        if comm in self.rows:
            return comm
        if len(self.rows) < self.budget:
            self.rows.add(comm)
            return comm
        if comm not in self._folded:
            self.overflow += 1
            self._folded[comm] = None
            if len(self._folded) > 4096:
                self._folded.popitem(last=False)
        return OTHER


class ProcessTable:
    def __init__(self, cap: int = DEFAULT_CAP, exit_grace_ns: int | None = None,
                 labels: int = DEFAULT_LABELS) -> None:
        self.cap = cap
        self.exit_grace_ns = exit_grace_ns
        self.labels = CommLabels(labels)
        self._retired: dict[str, dict[str, Any]] = {}  # counts of forgotten processes, by row
        self.procs: OrderedDict[tuple[int, int], ProcessRecord] = OrderedDict()
        self._by_mm: dict[int, tuple[int, int]] = {}
        self._comms: dict[bytes, str] = {}  # decoded comms, bounded with the table
        self.forgotten: Counter[str] = Counter()  # "exited", "cap"

    def __len__(self) -> int:
        return len(self.procs)

    def get(self, mm: int, pid: int, raw_comm: bytes | str, now_ns: int
            ) -> tuple[ProcessRecord, list[ProcessRecord]]:
        """The record of (mm, pid), created when new; and the records this one forced out
        (the cap), whose PMDs the caller forgets too."""
        key = (mm, pid)
        p = self.procs.get(key)
        if p is not None:
            self.procs.move_to_end(key)
            p.last_ns = max(p.last_ns, now_ns)
            if raw_comm and pid:
                p.comm = self._comm(raw_comm)
            return p, []
        comm = self._comm(raw_comm) if pid else ""
        p = ProcessRecord(mm, pid, comm, now_ns, now_ns, self.labels.label(comm, pid))
        old = self._by_mm.get(mm)
        if mm and old is not None and old != key:
            prev = self.procs.get(old)
            if prev is not None and prev.exited_ns is None:
                prev.exited_ns = now_ns  # its mm now belongs to another process
        if mm:
            self._by_mm[mm] = key
        self.procs[key] = p
        out = []
        while len(self.procs) > self.cap:
            _, victim = self.procs.popitem(last=False)
            self._unlink(victim)
            self.forgotten["cap"] += 1
            out.append(victim)
        return p, out

    def _comm(self, raw: bytes | str) -> str:
        if isinstance(raw, str):  # a pages part names it already decoded
            return raw
        got = self._comms.get(raw)
        if got is None:
            if len(self._comms) > 4 * self.cap:
                self._comms.clear()
            got = self._comms[raw] = decode_comm(raw)
        return got

    def _unlink(self, p: ProcessRecord) -> None:
        if self._by_mm.get(p.mm) == (p.mm, p.pid):
            del self._by_mm[p.mm]
        _fold(self._retired.setdefault(p.label, _row()), p)

    def by_comm(self) -> dict[str, dict[str, Any]]:
        """Totals per comm row (every process ever seen, forgotten ones included): counts,
        and waste by reason as Costs. Fresh objects; O(processes)."""
        out = {label: _copy(row) for label, row in self._retired.items()}
        for p in self.procs.values():
            _fold(out.setdefault(p.label, _row()), p)
        return out

    def owner(self, mm: int) -> ProcessRecord | None:
        """The process that owns `mm` now, if known."""
        key = self._by_mm.get(mm)
        return self.procs.get(key) if key is not None else None

    def exited(self, pid: int, now_ns: int) -> None:
        """The capture saw tgid `pid` exit: every mm it owned is gone."""
        for p in self.procs.values():
            if p.pid == pid and p.exited_ns is None:
                p.exited_ns = now_ns

    def expire(self, now_ns: int) -> list[ProcessRecord]:
        """Forget processes that exited more than exit_grace_ns ago; returns them."""
        if self.exit_grace_ns is None:
            return []
        gone = [p for p in self.procs.values()
                if p.exited_ns is not None and now_ns - p.exited_ns >= self.exit_grace_ns]
        for p in gone:
            del self.procs[(p.mm, p.pid)]
            self._unlink(p)
            self.forgotten["exited"] += 1
        return gone


def _row() -> dict[str, Any]:
    return {**dict.fromkeys(_COUNTS, 0), "processes": 0, "waste": {}}


def _fold(row: dict[str, Any], p: ProcessRecord) -> None:
    for k in _COUNTS:
        row[k] += getattr(p, k)
    row["processes"] += 1
    for reason, c in p.waste.items():
        row["waste"].setdefault(reason, Cost()).add(c.attempts, c.bytes, c.ns)


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "waste": {r: Cost(c.attempts, c.bytes, c.ns) for r, c in row["waste"].items()}}
