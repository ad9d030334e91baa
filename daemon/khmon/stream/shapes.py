"""The shapes of a recording's parts, checked where the Reader reads them.

A recording is a file anyone can write, and a part whose checksum matches can still say
anything. Everything the report, the correlator and the simulator will read from a header,
a stats part or a pages part is checked here, once, so that a crafted or foreign file is one
line and exit 2 (`header field kernel.release is a number, not a string`) instead of a
KeyError, TypeError or RecursionError deep inside a report. The header's event table is
also built into layouts here, and every layout's record struct and tuple type made, so a
broken format text or field list fails here too.

A spec is a type (`int` excludes bool), Opt(spec) (null allowed), a dict of keys to specs
(a key ending in `?` may be absent; other keys are allowed, so newer files still read),
MapOf(spec) (an object of any keys), ListOf(spec), Row(spec, ...) (a list of exactly those),
or Hex(n) (n hex digits).
"""

from __future__ import annotations

import keyword
import re
import struct
from dataclasses import dataclass
from typing import Any

from ..geometry import BITMAP_BYTES
from .events import FN_COLLAPSE, FN_PMD_SCAN, ISOLATE, SCAN_PMD
from .layout import EventLayout, layouts_from_header


class ShapeError(ValueError):
    """A part that is not what khmon writes; the message says where and what."""


@dataclass(frozen=True)
class Opt:
    spec: Any


@dataclass(frozen=True)
class MapOf:
    spec: Any


@dataclass(frozen=True)
class ListOf:
    spec: Any
    nonempty: bool = False


@dataclass(frozen=True)
class Row:
    specs: tuple[Any, ...]


@dataclass(frozen=True)
class Hex:
    digits: int


_NAMES = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}


def _what(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _wanted(spec: Any) -> str:
    if isinstance(spec, type):
        return _NAMES[spec]
    if isinstance(spec, Opt):
        return f"{_wanted(spec.spec)} or null"
    if isinstance(spec, (dict, MapOf)):
        return "an object"
    if isinstance(spec, Row):
        return f"a list of {len(spec.specs)}"
    if isinstance(spec, Hex):
        return f"{spec.digits} hex digits"
    return "a non-empty list" if spec.nonempty else "a list"


_HEX = re.compile(r"[0-9a-fA-F]*")


def check(spec: Any, value: Any, where: str) -> None:
    """Raise ShapeError unless `value` has the shape `spec`; `where` names it."""
    ok = True
    if spec is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(spec, type):
        ok = isinstance(value, spec)
    elif isinstance(spec, Opt):
        if value is not None:
            check(spec.spec, value, where)
        return
    elif isinstance(spec, Hex):
        ok = isinstance(value, str) and len(value) == spec.digits and bool(_HEX.fullmatch(value))
    elif isinstance(spec, dict):
        ok = isinstance(value, dict)
        if ok:
            for key, sub in spec.items():
                name = key.rstrip("?")
                if name in value:
                    check(sub, value[name], f"{where}.{name}" if where else name)
                elif not key.endswith("?"):
                    raise ShapeError(f"{where or 'it'} has no {name!r}")
    elif isinstance(spec, MapOf):
        ok = isinstance(value, dict)
        # the common case, a stats part's hundreds of counters, in one pass
        if ok and not (spec.spec is int and all(type(v) is int for v in value.values())):
            for k, v in value.items():
                check(spec.spec, v, f"{where}.{k}")
    elif isinstance(spec, Row):
        ok = isinstance(value, list) and len(value) == len(spec.specs)
        if ok:
            for i, (sub, v) in enumerate(zip(spec.specs, value, strict=True)):
                check(sub, v, f"{where}[{i}]")
    elif isinstance(spec, ListOf):
        ok = isinstance(value, list) and (bool(value) or not spec.nonempty)
        if ok:
            for i, v in enumerate(value):
                check(spec.spec, v, f"{where}[{i}]")
    if not ok:
        raise ShapeError(f"{where or 'it'} is {_what(value)}, not {_wanted(spec)}")


FIELD = Row((str, str, int, int, bool))  # name, C type, offset, size, signed
EVENT = {"name": str, "system": str, "hot": bool, "format?": str,
         "raw_args?": ListOf(FIELD, nonempty=True), "fields?": ListOf(FIELD, nonempty=True),
         "symbols?": MapOf(MapOf(str)), "probe?": Opt(str)}
HEADER = {
    "version": int, "kernel": {"release": str, "version?": str, "machine?": str},
    "start_mono_ns": int, "events": ListOf(EVENT, nonempty=True), "host?": str,
    "start_wall?": str, "attached?": MapOf(Opt(str)), "btf_offsets?": MapOf(Opt(int)),
    "owner_source?": str, "options?": {"pid?": int}, "vma_flag_bits?": MapOf(int),
    "function_probes?": {"mode?": Opt(str), "refused?": MapOf(str)},
    "pagemap_ref?": Opt(str), "settings?": MapOf(str), "counters?": MapOf(int),
    "recorder_pid?": int,
}
COUNTS = MapOf(int)
# exact[event] = [[order, status, uffd, n, ns, max_ns]], hist[event] = [[order, ok, bucket, n]]
# (khmon.capture.ringbuf.exact_rows); lost_pmds = [[mm, PMD address, lost in all]]
STATS = {"mono_ns": int, "wall?": str, "counters?": COUNTS,
         "probe?": {"seen?": COUNTS, "lost?": COUNTS, "missed?": COUNTS,
                    "exact?": MapOf(ListOf(Row((int, int, int, int, int, int)))),
                    "hist?": MapOf(ListOf(Row((int, int, int, int)))), "exact_full?": int},
         "settings?": MapOf(str), "exited?": ListOf(int), "lost_pmds?": ListOf(Row((int, int, int))),
         "pagemap?": {"dropped?": int, "failures?": int, "unresolved?": int, "error?": Opt(str),
                      "index_evicted?": int}}
BITMAP = Hex(2 * BITMAP_BYTES)
PAGES = {"mm": int, "address": int, "pid": int, "ref": int, "present": BITMAP, "zero": BITMAP,
         "swap": BITMAP, "none": int, "shared": int, "comm?": str, "ts?": int, "pfn?": int}

# Fields the correlator (model/correlate.py) reads from records of these events by name,
# and those it reads from the per-PMD exit when the PTE walk ran ("walk").
MODEL_FIELDS = {FN_PMD_SCAN: ("mm", "address", "vm_flags", "result"),
                FN_COLLAPSE: ("mm", "address", "duration_ns", "result"),
                ISOLATE: ("status",)}
# Fields it reads where the event has them (the mTHP series' order and bitmap; the VMA flags
# of the per-PMD call an attempt ran in): they must then be what khmon records.
OPTIONAL_FIELDS = {FN_COLLAPSE: ("order", "present", "vm_flags", "in_pmd_scan")}
WALK_FIELDS = ("present", "none_ptes", "swap_ptes", "zero_ptes", "zero_known")
BITMAP_FIELDS = ("present",)  # a byte array of BITMAP_BYTES wherever it is
# Settings that settings_from_sysfs() reads as numbers, and the mTHP size keys it parses.
NUMERIC_SETTINGS = ("khugepaged/max_ptes_none", "khugepaged/max_ptes_swap",
                    "khugepaged/max_ptes_shared")
SIZE_KEY = re.compile(r"hugepages-\d+kB/enabled")


def _check_names(lay: EventLayout) -> None:
    """The rules collections.namedtuple applies to a record type's name and fields
    (EventLayout.record_type), checked without paying for building one per event."""
    names = [lay.name, *lay.field_names]
    bad = next((n for n in names if not n.isidentifier() or keyword.iskeyword(n)), None)
    bad = bad or next((n for n in names[1:] if n.startswith("_")), None)
    if bad is not None or len(set(names[1:])) < len(names) - 1:
        raise ShapeError(f"event {lay.name!r} has a field name records cannot carry "
                         f"({bad!r})" if bad else f"event {lay.name!r} repeats a field name")


def _check_layout(lay: EventLayout, header: dict) -> None:
    """Build what a report builds from this layout, and check the fields the model reads."""
    _check_names(lay)
    _ = lay.struct, lay.fmt.status_field
    fields = {f.name: f for f in lay.fields}
    needed = list(MODEL_FIELDS.get(lay.name, ()))
    needed += [n for n in OPTIONAL_FIELDS.get(lay.name, ()) if n in fields]
    needed += WALK_FIELDS if lay.name == FN_PMD_SCAN and "walk" in fields else ()
    ref = header.get("pagemap_ref")
    needed += ("mm", "status", ref) if lay.name == SCAN_PMD and ref else ()
    for name in needed:
        if name not in fields:
            raise ShapeError(f"event {lay.name} has no field {name!r}, which the report reads")
        f = fields[name]
        array = "[" in f.ctype
        if (name in BITMAP_FIELDS) != (array and f.size == BITMAP_BYTES) or (
                name not in BITMAP_FIELDS and f.size not in (1, 2, 4, 8)):
            raise ShapeError(f"event {lay.name} field {name!r} is {f.ctype} of {f.size} bytes, "
                             "not what khmon records there")


def _check_settings(settings: dict[str, str], where: str) -> None:
    """The settings the simulator and the inference parse (settings_from_sysfs)."""
    for key in NUMERIC_SETTINGS:
        value = settings.get(key)
        if value is not None and not value.strip().isdigit():
            raise ShapeError(f"{where}.{key} is {value!r}, not a number")
    for key in settings:
        if key.startswith("hugepages-") and key.endswith("/enabled") and not SIZE_KEY.fullmatch(key):
            raise ShapeError(f"{where} has {key!r}, not hugepages-<size>kB/enabled")


def check_stats(meta: Any) -> None:
    """A stats or end part, including a settings change it carries."""
    check(STATS, meta, "")
    if "settings" in meta:
        _check_settings(meta["settings"], "settings")


def header_layouts(header: Any) -> list[EventLayout]:
    """The layouts a header describes, after checking everything a report reads from it."""
    check(HEADER, header, "")
    _check_settings(header.get("settings", {}), "settings")
    for i, e in enumerate(header["events"]):
        if not e.get("format") and ("fields" not in e or "symbols" not in e):
            raise ShapeError(f"events[{i}] has neither a format nor fields and symbols")
        for table, names in e.get("symbols", {}).items():
            if not all(n.lstrip("-").isdigit() for n in names):
                raise ShapeError(f"events[{i}].symbols.{table} has keys that are not numbers")
    try:
        layouts = layouts_from_header(header["events"])
        for lay in layouts:
            _check_layout(lay, header)
    except ShapeError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError,
            struct.error) as e:
        # parse_format, the record struct, the namedtuple of field names: they say why
        raise ShapeError(f"its event table does not describe records ({e})") from e
    return layouts
