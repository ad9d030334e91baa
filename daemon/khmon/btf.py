"""Struct member offsets from the running kernel's BTF.

bcc compiles against whatever headers are installed, which need not match the running
kernel (here: Debian 6.1/6.12 headers on a 6.18 kernel), and kernel-private structs are in
no header at all. So every struct field khmon reads in BPF is read with
bpf_probe_read_kernel at a byte offset taken from /sys/kernel/btf/vmlinux.

The BTF is read through `bpftool btf dump ... format raw` (Debian's bpftool), whose text
form lists each member's bits_offset; anonymous struct/union members are searched through,
as the kernel nests most of mm_struct inside one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import KhmonError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
_TYPE_RE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER_RE = re.compile(r"^\s+'([^']*)' type_id=(\d+) bits_offset=(\d+)")
_PARAM_RE = re.compile(r"^\s+'([^']*)' type_id=(\d+)\s*$")
_ATTR_RE = re.compile(r"(\w+)=(\S+)")


@dataclass(frozen=True)
class BtfType:
    kind: str
    name: str
    attrs: dict[str, str]
    members: tuple[tuple[str, int, int], ...]  # (name, type_id, bits_offset); params: offset 0


class Btf:
    """A parsed raw BTF dump; lookups of struct members by name."""

    def __init__(self, raw_text: str) -> None:
        self.types: dict[int, BtfType] = {}
        self._by_name: dict[tuple[str, str], int] = {}
        cur: tuple[int, str, str, dict[str, str]] | None = None
        members: list[tuple[str, int, int]] = []

        def flush() -> None:
            if cur is not None:
                tid, kind, name, attrs = cur
                self.types[tid] = BtfType(kind, name, attrs, tuple(members))
                if name != "(anon)":
                    self._by_name.setdefault((kind, name), tid)

        for line in raw_text.splitlines():
            m = _TYPE_RE.match(line)
            if m:
                flush()
                cur = (int(m.group(1)), m.group(2), m.group(3),
                       dict(_ATTR_RE.findall(m.group(4))))
                members = []
                continue
            if cur is not None and cur[1] in ("STRUCT", "UNION"):
                mm = _MEMBER_RE.match(line)
                if mm:
                    members.append((mm.group(1), int(mm.group(2)), int(mm.group(3))))
            elif cur is not None and cur[1] == "FUNC_PROTO":
                mp = _PARAM_RE.match(line)
                if mp:
                    members.append((mp.group(1), int(mp.group(2)), 0))
        flush()

    @classmethod
    def from_kernel(cls, path: Path = VMLINUX_BTF) -> Btf:
        if not path.exists():
            raise KhmonError(f"no BTF at {path}", "khmon needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")
        tool = shutil.which("bpftool") or "/usr/sbin/bpftool"
        try:
            out = subprocess.run([tool, "btf", "dump", "file", str(path), "format", "raw"],
                                 check=True, capture_output=True, text=True).stdout
        except FileNotFoundError as e:
            raise KhmonError("bpftool is not installed", "apt-get install bpftool (make setup)") from e
        except subprocess.CalledProcessError as e:
            raise KhmonError(f"bpftool could not read {path}: {e.stderr.strip()}", "run as root") from e
        return cls(out)

    def find(self, kind: str, name: str) -> int | None:
        return self._by_name.get((kind, name))

    def _strip(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        while tid and self.types[tid].kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT",
                                               "TYPE_TAG"):
            tid = int(self.types[tid].attrs["type_id"])
        return tid

    def member_offset(self, struct: str, member: str) -> int | None:
        """Byte offset of `member` (a dotted path allowed) in `struct <struct>`, or None."""
        tid = self.find("STRUCT", struct)
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
        """(bits offset, member type id) of `name`, searching anonymous members too."""
        for mname, mtype, bits in self.types[tid].members:
            if mname == name:
                return bits, self._strip(mtype)
        for mname, mtype, bits in self.types[tid].members:
            inner = self._strip(mtype)
            if mname == "(anon)" and self.types[inner].kind in ("STRUCT", "UNION"):
                found = self._find_member(inner, name)
                if found is not None:
                    return bits + found[0], found[1]
        return None

    def has_func(self, name: str) -> bool:
        return self.find("FUNC", name) is not None

    def scalar(self, tid: int) -> Scalar | None:
        """How a parameter of type `tid` travels in a u64 register: size, signedness and a C
        spelling; None for anything that is not an integer, enum or pointer."""
        tid = self._strip(tid)
        t = self.types.get(tid)
        if t is None:
            return None
        if t.kind == "PTR":
            target = self._strip(int(t.attrs["type_id"]))
            tt = self.types.get(target)
            name = f"struct {tt.name} *" if tt and tt.kind == "STRUCT" else "void *"
            return Scalar(name, 8, False)
        if t.kind == "INT":
            enc = t.attrs.get("encoding", "")
            return Scalar("bool" if enc == "BOOL" else t.name, int(t.attrs["size"]),
                          enc == "SIGNED")
        if t.kind in ("ENUM", "ENUM64"):
            return Scalar(f"enum {t.name}", int(t.attrs["size"]),
                          t.attrs.get("encoding") == "SIGNED")
        return None

    def func_params(self, func: str) -> list[tuple[str, Scalar | None]] | None:
        """(name, scalar type) of each parameter of FUNC `func`, or None if BTF lacks it."""
        fid = self.find("FUNC", func)
        if fid is None:
            return None
        proto = self.types[int(self.types[fid].attrs["type_id"])]
        return [(name, self.scalar(tid)) for name, tid, _ in proto.members]


@dataclass(frozen=True)
class Scalar:
    """A scalar C type as BTF describes it."""

    ctype: str
    size: int
    signed: bool
