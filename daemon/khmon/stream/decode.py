"""The decoder: each record batch is decoded once, into the views its consumers need.

A batch is one R part: fixed-size records of one event (stream.layout). Consumers want
different things from it: the counters want the distinct (owner, status, order, flags)
combinations with their weights, the PMD correlator wants every record as a named tuple,
the pagemap sampler wants the scanned pages. A Batch computes each view on first use and
keeps it, so however many consumers read a batch, it is unpacked once per view. Comm and
status decoding also live here, so every consumer names things the same way.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from typing import Any

from .layout import EventLayout


def comm(raw: bytes) -> str:
    """A task's comm as the kernel stores it (16 bytes, NUL-padded) -> text. Undecodable
    bytes become U+FFFD; comms are untrusted (any process names itself), so text outputs
    escape them on display (khmon.outputs.escape), never here."""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class Batch:
    """One R part, decoded lazily and at most once per view."""

    __slots__ = ("__dict__", "data", "layout")

    def __init__(self, layout: EventLayout, data: bytes) -> None:
        self.layout = layout
        self.data = data

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def n_records(self) -> int:
        return len(self.data) // self.layout.size

    @cached_property
    def rows(self) -> list[Any]:
        """Every record as the event's named tuple (header fields, then the event's own)."""
        make = self.layout.record_type._make
        return [make(t) for t in self.layout.struct.iter_unpack(self.data)]

    def distinct(self, fields: tuple[str, ...]) -> dict[tuple, int]:
        """How many records share each combination of `fields`, as tuples in the order the
        fields are given. Identical tuples are counted in C, so a batch of thousands of
        repeats costs one Python step per distinct combination."""
        cache = self.__dict__.setdefault("_distinct", {})
        got = cache.get(fields)
        if got is None:
            lay = self.layout
            ordered = lay.record_order(fields)
            rows = lay.projection(ordered).iter_unpack(self.data)
            # one record (the common case between other events' records) skips the Counter
            raw = {next(rows): 1} if len(self.data) == lay.size else Counter(rows)
            if ordered != fields:
                pick = [ordered.index(f) for f in fields]
                raw = Counter({tuple(t[i] for i in pick): n for t, n in raw.items()})
            got = cache[fields] = raw
        return got


class Decoder:
    """Turns a stream's R parts into Batches, given the stream's layouts."""

    def __init__(self, layouts: list[EventLayout]) -> None:
        self.layouts = layouts
        self.errors = 0  # parts that name no event or do not fit its layout

    def batch(self, event: int, data: bytes) -> Batch | None:
        """The batch of one R part; None (counted in `errors`) when it cannot be decoded.
        A recording's reader refuses such parts already; live parts come from khmon's own
        BPF code, so an error here is a khmon bug, counted rather than raised mid-capture."""
        if not 0 <= event < len(self.layouts) or len(data) % self.layouts[event].size:
            self.errors += 1
            return None
        return Batch(self.layouts[event], data)
