"""bench/top_frame.py still runs (`make bench` is not part of the test command).

It runs briefly and must print every case's numbers and the target line; no assertion is
about speed (benchmarks print numbers, timed tests would measure this machine's noise).
It needs tmux and no root, like the other terminal tests here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROW = r"\s+[\d.]+MB\s+[\d.]+ms\s+[\d.]+ms\s+[\d.]+%\s+[\d.]+MB\s+[\d.]+MB\s+[\d.]+ s"


def test_top_frame_benchmark_runs() -> None:
    p = subprocess.run([sys.executable, "bench/top_frame.py", "--seconds", "3", "--warmup", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert re.search(r"^snapshot: 1,000 processes, 20,000 PMD records", p.stdout, re.M), p.stdout
    for case in ("daemon cap 20", "top cap 200", "all procs, pid", "uncapped"):
        assert re.search(rf"^{re.escape(case)}{ROW}$", p.stdout, re.M), (case, p.stdout)
    assert re.search(r"^targets \(all but uncapped\): <= 5% of a core, <= 80 MB: (met|MISSED)$",
                     p.stdout, re.M), p.stdout
