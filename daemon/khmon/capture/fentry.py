"""fentry/fexit, tried before anything is compiled: can this kernel trace a function with
a BPF trampoline, and would attaching one now hang?

A function can be in BTF and kallsyms and still be refused (EPERM under lockdown, as on the
CI host), so khmon asks the kernel with a two-instruction program through the bpf syscall,
in milliseconds, where a bcc compile costs a second here and half a minute in a TCG guest.
Compiled programs the kernel refused anyway are remembered until the next boot (_Refusals).
No bcc here: plain ctypes over the stable bpf(2) ABI.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import struct
from pathlib import Path

from ..kernel.sysfs import KHUGEPAGED

# The bpf(2) ABI (include/uapi/linux/bpf.h; stable, so these are not the running kernel's to
# tell): the x86-64 syscall number, commands, the program and attach types of an fentry
# program, and where union bpf_attr's BPF_PROG_LOAD members sit.
_SYS_BPF = 321
_BPF_PROG_LOAD, _BPF_RAW_TRACEPOINT_OPEN = 5, 17
_BPF_PROG_TYPE_TRACING = 26
_BPF_TRACE_FENTRY, _BPF_TRACE_FEXIT = 24, 25
_ATTR_SIZE = 128
_EXPECTED_ATTACH_TYPE_AT, _ATTACH_BTF_ID_AT = 68, 108
_RETURN_0 = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0; exit


def trampoline_would_block(khugepaged: Path = KHUGEPAGED) -> str | None:
    """Why attaching or detaching an fentry/fexit program now could hang khmon, or None.
    The BPF trampoline is patched only after an RCU-tasks grace period, which ends when
    every task has slept once (a voluntary switch; a preemption does not count). With
    scan_sleep_millisecs 0, khugepaged never sleeps while it has mm's to scan (it only
    calls cond_resched()), so the attach waits, unkillable, for as long as that lasts
    (docs/kernels.md). Kprobes do not wait for it."""
    try:
        sleep_ms = (khugepaged / "scan_sleep_millisecs").read_text().strip()
    except OSError:
        return None
    if sleep_ms != "0":
        return None
    return ("khugepaged/scan_sleep_millisecs is 0: khugepaged never sleeps while it has work, "
            "and attaching fentry waits until every task has slept once (an RCU-tasks grace "
            "period), so it would block until khugepaged sleeps (kprobes do not wait for it)")


def fentry_refusal(func: str, btf_id: int | None, fexit: bool = False) -> str | None:
    """Load and attach a two-instruction fentry program on `func` (its BTF type id), and with
    `fexit` an fexit one, through the bpf syscall: None if the kernel allowed them, else the
    kernel's reason. Tried, not guessed (a function can be in BTF and kallsyms and still be
    refused, EPERM under lockdown as on the CI host), and in milliseconds, where a bcc compile
    costs a second here and half a minute in a TCG guest. It answers for the kernel only; a
    compile the kernel then refuses anyway is remembered by _Refusals."""
    if btf_id is None:
        return f"{func} is not in the kernel's BTF"
    if (why := trampoline_would_block()) is not None:
        return why
    kinds = [("fentry", _BPF_TRACE_FENTRY)] + ([("fexit", _BPF_TRACE_FEXIT)] if fexit else [])
    return next((err for kind, attach_type in kinds
                 if (err := _trace_trial(func, btf_id, kind, attach_type)) is not None), None)


def _trace_trial(func: str, btf_id: int, kind: str, attach_type: int) -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(_RETURN_0, len(_RETURN_0))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = (ctypes.c_char * _ATTR_SIZE)()
    struct.pack_into("<IIQQIIQ", attr, 0, _BPF_PROG_TYPE_TRACING, len(_RETURN_0) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1, len(log),
                     ctypes.addressof(log))
    struct.pack_into("<I", attr, _EXPECTED_ATTACH_TYPE_AT, attach_type)
    struct.pack_into("<I", attr, _ATTACH_BTF_ID_AT, btf_id)
    prog = libc.syscall(_SYS_BPF, _BPF_PROG_LOAD, attr, _ATTR_SIZE)
    if prog < 0:
        why = log.value.decode(errors="replace").strip().splitlines()
        return _errno_text(ctypes.get_errno(), f"loading {kind} on {func}") + (
            f": {why[-1]}" if why else "")
    try:
        link_attr = (ctypes.c_char * 16)()
        struct.pack_into("<QI", link_attr, 0, 0, prog)  # name NULL: attach at the BTF target
        link = libc.syscall(_SYS_BPF, _BPF_RAW_TRACEPOINT_OPEN, link_attr, 16)
        if link < 0:
            return _errno_text(ctypes.get_errno(), f"attaching {kind} to {func}")
        os.close(link)
        return None
    finally:
        os.close(prog)


def _errno_text(err: int, doing: str) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)}) {doing}"


class _Refusals:
    """fentry/fexit programs the kernel refused since boot, in /run (a tmpfs): fentry_refusal()
    asks the kernel about the targets before compiling, but the compiled programs can still be
    refused (the verifier, an fexit limit), and that is the kernel's answer until it reboots,
    so khmon skips the compile (half a minute in a TCG guest) and reports the recorded error.
    Keyed by the boot and the text of the fentry/fexit programs, which does not change with
    options (-p, ring buffer size are #defines) or doctor's stub."""

    DIR = Path("/run/khmon")

    def _path(self, source: str) -> Path:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = "unknown"
        progs = re.findall(r"^K(?:RET)?FUNC_PROBE\(.*?^}$", source, re.M | re.S)
        digest = hashlib.sha256("\n".join([boot, *progs]).encode()).hexdigest()[:24]
        return self.DIR / f"refused-{digest}"

    def get(self, source: str) -> str | None:
        try:
            return self._path(source).read_text()
        except OSError:
            return None

    def put(self, source: str, error: str) -> None:
        with contextlib.suppress(OSError):
            self.DIR.mkdir(mode=0o700, exist_ok=True)
            self._path(source).write_text(error)


refusals = _Refusals()
