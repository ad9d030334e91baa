"""THP and khugepaged state from sysfs and /proc/vmstat: counters, settings, and overrides.

Counters are the kernel's own ground truth that khmon's counts are checked against:
/proc/vmstat thp_*, khugepaged/pages_collapsed and full_scans, and the per-size
hugepages-<N>kB/stats/* files (per-order collapse_* counters arrived with mTHP collapse).
Settings are recorded in each recording's header so a report says what khugepaged was
told to do. `override()` changes settings and always puts them back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..errors import KhmonError

THP = Path("/sys/kernel/mm/transparent_hugepage")
KHUGEPAGED = THP / "khugepaged"
VMSTAT = Path("/proc/vmstat")
# khugepaged files that count rather than configure.
KHUGEPAGED_COUNTERS = ("pages_collapsed", "full_scans")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _size_dirs(thp: Path) -> list[Path]:
    """hugepages-<N>kB directories (mTHP sizes), smallest first."""
    dirs = [d for d in thp.glob("hugepages-*kB") if d.is_dir()]
    return sorted(dirs, key=lambda d: int(d.name[len("hugepages-"):-2]))


def khugepaged_pid(proc: Path = Path("/proc")) -> int | None:
    """The pid of the khugepaged kernel thread (None while THP is off: the thread is started
    and stopped with `enabled`, so its pid changes across such switches)."""
    for p in proc.iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().strip() == "khugepaged":
                    return int(p.name)
    return None


def read_counters(thp: Path = THP, vmstat: Path = VMSTAT) -> dict[str, int]:
    """Every THP counter the kernel exposes, by name.

    Names: /proc/vmstat's own (thp_collapse_alloc ...), khugepaged/<name>, and
    hugepages-<N>kB/<stat> for the per-size stats files.
    """
    out: dict[str, int] = {}
    text = _read(vmstat) or ""
    for line in text.splitlines():
        name, _, val = line.partition(" ")
        if name.startswith("thp_"):
            out[name] = int(val)
    for name in KHUGEPAGED_COUNTERS:
        val = _read(thp / "khugepaged" / name)
        if val is not None:
            out[f"khugepaged/{name}"] = int(val)
    for d in _size_dirs(thp):
        stats = d / "stats"
        if stats.is_dir():
            for f in sorted(stats.iterdir()):
                val = _read(f)
                if val is not None and val.lstrip("-").isdigit():
                    out[f"{d.name}/{f.name}"] = int(val)
    return out


def counter_delta(start: dict[str, int], end: dict[str, int]) -> dict[str, int]:
    return {k: end[k] - start[k] for k in end if k in start}


def read_settings(thp: Path = THP) -> dict[str, str]:
    """THP and khugepaged knobs as their files show them (e.g. 'always [madvise] never')."""
    out: dict[str, str] = {}
    for name in ("enabled", "defrag", "use_zero_page", "shmem_enabled"):
        val = _read(thp / name)
        if val is not None:
            out[name] = val
    kh = thp / "khugepaged"
    if kh.is_dir():
        for f in sorted(kh.iterdir()):
            if f.name not in KHUGEPAGED_COUNTERS and f.is_file():
                val = _read(f)
                if val is not None:
                    out[f"khugepaged/{f.name}"] = val
    for d in _size_dirs(thp):
        val = _read(d / "enabled")
        if val is not None:
            out[f"{d.name}/enabled"] = val
    return out


def selected(value: str) -> str:
    """The bracketed choice of a sysfs multiple-choice file: 'always [madvise] never' -> madvise."""
    if "[" in value:
        return value[value.index("[") + 1:value.index("]")]
    return value


@contextlib.contextmanager
def override(settings: dict[str, str], thp: Path = THP) -> Iterator[dict[str, str]]:
    """Write THP/khugepaged settings (paths relative to transparent_hugepage/) and restore
    every one of them on exit, whatever happens inside."""
    saved: dict[str, str] = {}
    try:
        for rel, value in settings.items():
            path = thp / rel
            old = _read(path)
            if old is None:
                raise KhmonError(f"{path} does not exist on this kernel",
                                 "drop that setting or use a kernel that has it")
            saved[rel] = selected(old)
            try:
                path.write_text(value)
            except OSError as e:
                raise KhmonError(f"cannot write {value!r} to {path}: {e.strerror}",
                                 "run as root") from e
        yield saved
    finally:
        for rel, old in reversed(saved.items()):
            with contextlib.suppress(OSError):
                (thp / rel).write_text(old)
