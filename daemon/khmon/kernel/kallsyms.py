"""/proc/kallsyms: where the running kernel's symbols are, and which exist at all.

An inlined function can still be in BTF (if some copy survived), but attaching needs its
symbol; data symbols (page_offset_base) are there only with CONFIG_KALLSYMS_ALL.
"""

from __future__ import annotations

from collections.abc import Iterable

KALLSYMS = "/proc/kallsyms"


def addresses(names: Iterable[str], path: str = KALLSYMS) -> dict[str, int]:
    """Addresses of these vmlinux symbols (text or data) in /proc/kallsyms; a name missing
    from the result is not listed. Addresses are 0 for non-root readers (kptr_restrict),
    which plan() reports as such."""
    wanted, found = set(names), {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                # Module symbols have a fourth column, [module]; khmon wants vmlinux's.
                if len(parts) == 3 and parts[2] in wanted and parts[2] not in found:
                    found[parts[2]] = int(parts[0], 16)
    except OSError:
        pass
    return found


def present(names: Iterable[str], path: str = KALLSYMS) -> set[str]:
    """Which of these names /proc/kallsyms lists."""
    return set(addresses(names, path))
