"""Struct member offsets and function signatures from the running kernel's BTF.

bcc compiles against whatever headers are installed, which need not match the running
kernel (here: Debian 6.1/6.12 headers on a 6.18 kernel), and kernel-private structs are in
no header at all. So every struct field khmon reads in BPF is read with
bpf_probe_read_kernel at a byte offset taken from /sys/kernel/btf/vmlinux, and raw
tracepoint arguments are named by BTF's __bpf_trace_<event> functions.

The binary format (include/uapi/linux/btf.h, Documentation/bpf/btf.rst) is walked once,
keeping each type's position; names, members and parameters are decoded only when asked
for. That takes a fraction of a second, which matters in TCG guests where every CLI
process pays it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import KhmonError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_U32 = struct.Struct("<I")
_MEMBER = struct.Struct("<III")
_PARAM = struct.Struct("<II")
_ENUM = struct.Struct("<Ii")

# BTF_KIND_* numbers, and the bytes each kind carries after its 12-byte btf_type
# (per vlen entry where it depends on vlen).
KINDS = {1: "INT", 2: "PTR", 3: "ARRAY", 4: "STRUCT", 5: "UNION", 6: "ENUM", 7: "FWD",
         8: "TYPEDEF", 9: "VOLATILE", 10: "CONST", 11: "RESTRICT", 12: "FUNC",
         13: "FUNC_PROTO", 14: "VAR", 15: "DATASEC", 16: "FLOAT", 17: "DECL_TAG",
         18: "TYPE_TAG", 19: "ENUM64"}
_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
_QUALIFIERS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}
_INT_SIGNED, _INT_BOOL = 1, 4


@dataclass(frozen=True)
class Scalar:
    """A scalar C type as BTF describes it."""

    ctype: str
    size: int
    signed: bool


class Btf:
    """One BTF blob: types by id, looked up by kind and name."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise ValueError("BTF blob too short")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            _HEADER.unpack_from(data)
        if magic != BTF_MAGIC:
            raise ValueError(f"bad BTF magic {magic:#x}")
        self._data = data
        self._str0 = hdr_len + str_off
        self._str_end = self._str0 + str_len
        # Per type id (index 0 is void): (kind number, name_off, info, size_or_type, pos of
        # the kind-specific data).
        self._types: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]
        self._by_name_off: dict[int, list[int]] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        types, by_name = self._types, self._by_name_off
        while pos < end:
            name_off, info, sot = _TYPE.unpack_from(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            pos += _TYPE.size
            if name_off:
                by_name.setdefault(name_off, []).append(len(types))
            types.append((kind, name_off, info, sot, pos))
            pos += _FIXED_EXTRA.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen

    @classmethod
    def from_kernel(cls, path: Path = VMLINUX_BTF) -> Btf:
        try:
            return cls(path.read_bytes())
        except FileNotFoundError as e:
            raise KhmonError(f"no BTF at {path}",
                             "khmon needs a kernel built with CONFIG_DEBUG_INFO_BTF=y") from e
        except OSError as e:
            raise KhmonError(f"cannot read {path}: {e.strerror}", "run as root") from e
        except ValueError as e:
            raise KhmonError(f"{path} is not BTF: {e}", "is this a BTF-enabled kernel?") from e

    @property
    def n_types(self) -> int:
        return len(self._types) - 1

    def _name(self, name_off: int) -> str:
        start = self._str0 + name_off
        return self._data[start:self._data.index(b"\0", start)].decode()

    def _kind(self, tid: int) -> str:
        return KINDS.get(self._types[tid][0], "UNKNOWN")

    def find(self, kind: str, name: str) -> int | None:
        """The id of the first type of this kind and name, or None."""
        # Strings are NUL-separated and the section starts with the empty string's NUL, so
        # every name is preceded by a NUL: b"\0name\0" matches whole names only.
        needle = b"\0" + name.encode() + b"\0"
        start = self._str0
        while True:
            at = self._data.find(needle, start, self._str_end)
            if at < 0:
                return None
            for tid in self._by_name_off.get(at + 1 - self._str0, ()):
                if self._kind(tid) == kind:
                    return tid
            start = at + 1

    def _strip(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        while tid and self._kind(tid) in _QUALIFIERS:
            tid = self._types[tid][3]
        return tid

    def _members(self, tid: int) -> list[tuple[str, int, int]]:
        """(name, type id, bit offset) of a struct or union's members; '' for anonymous."""
        _kind, _name_off, info, _size, pos = self._types[tid]
        bitfields = bool(info >> 31)
        out = []
        for i in range(info & 0xFFFF):
            name_off, mtype, off = _MEMBER.unpack_from(self._data, pos + i * _MEMBER.size)
            bits = off & 0xFFFFFF if bitfields else off
            out.append((self._name(name_off) if name_off else "", mtype, bits))
        return out

    def member_offset(self, struct_name: str, member: str) -> int | None:
        """Byte offset of `member` (a dotted path allowed) in `struct <struct_name>`, or None."""
        tid = self.find("STRUCT", struct_name)
        if tid is None:
            return None
        total = 0
        for part in member.split("."):
            found = self._find_member(tid, part)
            if found is None:
                return None
            bits, tid = found
            total += bits
        return total // 8

    def _find_member(self, tid: int, name: str) -> tuple[int, int] | None:
        """(bit offset, member type id) of `name`, searching anonymous members too."""
        members = self._members(tid)
        for mname, mtype, bits in members:
            if mname == name:
                return bits, self._strip(mtype)
        for mname, mtype, bits in members:
            inner = self._strip(mtype)
            if not mname and self._kind(inner) in ("STRUCT", "UNION"):
                found = self._find_member(inner, name)
                if found is not None:
                    return bits + found[0], found[1]
        return None

    def enum_value(self, name: str) -> int | None:
        """The value of the enum constant `name` (in any enum), or None."""
        needle = b"\0" + name.encode() + b"\0"
        at = self._data.find(needle, self._str0, self._str_end)
        if at < 0:
            return None
        name_off = at + 1 - self._str0
        for kind, _n, info, _s, pos in self._types:
            if KINDS.get(kind) == "ENUM":
                for i in range(info & 0xFFFF):
                    off, val = _ENUM.unpack_from(self._data, pos + i * _ENUM.size)
                    if off == name_off:
                        return val
        return None

    def struct_size(self, name: str) -> int | None:
        """sizeof(struct name), or None if BTF has no such struct."""
        tid = self.find("STRUCT", name)
        return self._types[tid][3] if tid is not None else None

    def has_func(self, name: str) -> bool:
        return self.find("FUNC", name) is not None

    def scalar(self, tid: int) -> Scalar | None:
        """How a parameter of type `tid` travels in a u64 register: size, signedness and a C
        spelling; None for anything that is not an integer, enum or pointer."""
        tid = self._strip(tid)
        if not tid:
            return None
        kind, name_off, info, size, pos = self._types[tid]
        kname = KINDS.get(kind)
        if kname == "PTR":
            target = self._strip(size)
            named = target and self._kind(target) == "STRUCT" and self._types[target][1]
            return Scalar(f"struct {self._name(self._types[target][1])} *" if named else "void *",
                          8, False)
        if kname == "INT":
            (enc,) = _U32.unpack_from(self._data, pos)
            enc = (enc >> 24) & 0x0F
            name = "bool" if enc & _INT_BOOL else self._name(name_off)
            return Scalar(name, size, bool(enc & _INT_SIGNED))
        if kname in ("ENUM", "ENUM64"):
            return Scalar(f"enum {self._name(name_off)}", size, bool(info >> 31))
        return None

    def func_params(self, func: str) -> list[tuple[str, Scalar | None]] | None:
        """(name, scalar type) of each parameter of FUNC `func`, or None if BTF lacks it."""
        fid = self.find("FUNC", func)
        if fid is None:
            return None
        proto = self._types[fid][3]
        _kind, _n, info, _s, pos = self._types[proto]
        out = []
        for i in range(info & 0xFFFF):
            name_off, ptype = _PARAM.unpack_from(self._data, pos + i * _PARAM.size)
            out.append((self._name(name_off) if name_off else "", self.scalar(ptype)))
        return out
