"""The benchmarks still run, and leave the machine as they found it.

`make bench` is not part of the test command, so a change to the capture or the header once
broke bench/replay.py unnoticed. These run each benchmark briefly and check what it must
get right whatever the speed: it exits 0, prints its numbers, and the overhead benchmark
restores the khugepaged and THP knobs and khugepaged's CPU affinity, and khmon's capture in
it loses nothing uncounted. No assertion here is about speed (benchmarks print numbers;
timed tests would only measure this machine's noise).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from khmon.kernel import sysfs
from tests.support.live import UNDER_TCG

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_replay_benchmark_runs() -> None:
    p = _bench("bench/replay.py", "--events", "20000", "--rounds", "1", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"^replay \(Reader \+ Model \+ report\): best [\d,]+ events/s",
                     p.stdout, re.M), p.stdout
    assert re.search(r"^target >= 1,000,000 events/s: (MET|MISSED)$", p.stdout, re.M)


def test_soak_benchmark_runs() -> None:
    """Its last line has every figure, and the model's totals never went down (monotonic is
    a property of the model, not a speed)."""
    p = _bench("bench/soak.py", "--events", "3000000", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"soak: events=\d+ events_per_s=\d+ rss_mb_10=[\d.]+ rss_mb_50=[\d.]+ "
                        r"rss_mb_100=[\d.]+ snapshot_ms_p99=[\d.]+ pmds_tracked_max=\d+ "
                        r"evicted=\d+ monotonic=yes", last), p.stdout[-2000:]


# In the QEMU/TCG guests (tests/vm/run.sh sets this), attaching or detaching probes while
# khugepaged scans flat out races TCG's handling of code patched under a running vCPU: the
# 6.1 guest's khugepaged oopsed calling a half-patched static call (RIP 0), as the 7.2 guest
# once did on an int3. There the benchmark runs without its khmon windows; on the host, in
# CI, with them.


def test_overhead_benchmark_runs_and_restores() -> None:
    before, kh = sysfs.read_settings(), sysfs.khugepaged_pid()
    assert kh is not None, "no khugepaged thread"
    affinity = os.sched_getaffinity(kh)
    p = _bench("bench/overhead.py", "--rounds", "1", "--window", "1", "--pmds", "256",
               "--modes", "none" if UNDER_TCG else "none,khmon,daemon", "--no-bpf-stats",
               "--pin", "auto", "--quiet-timeout", "0", "--daemon-soak", "3", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert sysfs.read_settings() == before
    assert os.sched_getaffinity(kh) == affinity
    assert "per pinned CPU" in p.stdout
    if UNDER_TCG:
        return
    # Every event khmon's probes saw was recorded or counted lost (the capture's own proof).
    hit = re.search(r"lost over whole captures: (\d+), unaccounted: (\d+)", p.stdout)
    assert hit, p.stdout[-3000:]
    assert hit.group(2) == "0"
    # the daemon mode: its windows, and the soak's RSS and scrape lines
    assert re.search(r"daemon \(median over its windows\): events seen [\d,]+/s", p.stdout)
    assert re.search(r"RSS after attach [\d.]+ MiB, after \d+ s [\d.]+ MiB", p.stdout)
    assert re.search(r"scrape \(whole response, \d+ scrapes\): median [\d.]+ ms", p.stdout)


def test_bitmap_cost_benchmark_runs() -> None:
    """Where the kernel refuses function probes (the host) it times the user-space sources
    and says why the BPF ones are missing; in the guests it times those too."""
    before = sysfs.read_settings()
    p = _bench("bench/bitmap_cost.py", "--pmds", "4", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert re.search(r"^pagemap \(user space\): [\d,.]+ us per PMD", p.stdout, re.M), p.stdout
    assert re.search(r"^ptwalk / kernel(: no function probes| \((kfunc|kprobe)\): [\d,]+ PMD records)",
                     p.stdout, re.M), p.stdout
    assert sysfs.read_settings() == before
