"""Tracepoint format files: field layouts and __print_symbolic status tables.

Every field khmon copies out of a tracepoint, and every status name it prints, comes from
the event's `format` file in tracefs (events/<system>/<event>/format). Status numbers differ
between kernels (enum scan_result was renumbered by the mTHP collapse series), so nothing
here hard-codes a table: the `__print_symbolic(REC->status, {0, "failed"}, ...)` clause of the
print fmt line is the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FIELD_RE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);"
)
_SYMBOLIC_RE = re.compile(r"__print_symbolic\(\s*REC->(?P<field>\w+)\s*,(?P<body>.*?\})\s*\)")
_PAIR_RE = re.compile(r"\{\s*(-?(?:0x[0-9a-fA-F]+|\d+))\s*,\s*\"([^\"]*)\"\s*\}")


@dataclass(frozen=True)
class Field:
    """One field of a tracepoint record, at its byte offset in the kernel's trace entry."""

    name: str
    ctype: str  # the declared C type, e.g. "struct mm_struct *" or "__data_loc char[]"
    offset: int
    size: int
    signed: bool

    @property
    def is_common(self) -> bool:
        """common_* fields are the trace entry header, not the event's own data."""
        return self.name.startswith("common_")

    @property
    def is_data_loc(self) -> bool:
        """A __data_loc field is a u32 (len << 16 | offset) pointing at a dynamic string."""
        return self.ctype.startswith("__data_loc")


@dataclass(frozen=True)
class EventFormat:
    """A parsed tracepoint format file."""

    system: str
    name: str
    id: int
    fields: tuple[Field, ...]
    symbols: dict[str, dict[int, str]] = field(default_factory=dict)
    text: str = ""  # the format file itself, kept so recordings can be decoded anywhere

    @property
    def own_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.is_common)

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def status_field(self) -> str | None:
        """The field whose values have a symbolic table (status or result), if any."""
        for name in ("status", "result"):
            if name in self.symbols:
                return name
        return next(iter(self.symbols), None)

    def symbol(self, field_name: str, value: int) -> str:
        """The kernel's name for `value`; `unknown:<n>` when the table lacks it."""
        return self.symbols.get(field_name, {}).get(value, f"unknown:{value}")


def _split_decl(decl: str) -> tuple[str, str]:
    """Split a C declaration like `struct mm_struct * mm` or `char comm[16]` into (type, name)."""
    decl = decl.strip()
    m = re.match(r"^(?P<type>.*?)(?P<name>\w+)\s*(?P<arr>\[[^\]]*\])?$", decl)
    if not m:
        raise ValueError(f"cannot parse field declaration {decl!r}")
    ctype = (m.group("type").strip() + (m.group("arr") or "")).strip()
    if ctype.startswith("__data_loc") and not ctype.endswith("]"):
        ctype += "[]"
    return ctype, m.group("name")


def parse_symbolic_tables(print_fmt: str) -> dict[str, dict[int, str]]:
    """Every __print_symbolic(REC->field, {n, "name"}, ...) table of a print fmt line."""
    tables: dict[str, dict[int, str]] = {}
    for m in _SYMBOLIC_RE.finditer(print_fmt):
        pairs = {int(num, 0): name for num, name in _PAIR_RE.findall(m.group("body"))}
        tables.setdefault(m.group("field"), {}).update(pairs)
    return tables


def parse_format(text: str, system: str = "") -> EventFormat:
    """Parse the text of one tracepoint format file."""
    name = ""
    event_id = -1
    fields: list[Field] = []
    print_fmt = ""
    for line in text.splitlines():
        if line.startswith("name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            event_id = int(line.split(":", 1)[1])
        elif line.startswith("print fmt:"):
            print_fmt = line
        else:
            m = _FIELD_RE.match(line)
            if m:
                ctype, fname = _split_decl(m.group("decl"))
                fields.append(
                    Field(fname, ctype, int(m.group("offset")), int(m.group("size")),
                          m.group("signed") == "1")
                )
    if not name or not fields:
        raise ValueError("not a tracepoint format file (no name: or field: lines)")
    return EventFormat(system, name, event_id, tuple(fields), parse_symbolic_tables(print_fmt),
                       text)
