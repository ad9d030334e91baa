"""Service tests: a real Prometheus (and promtool) against real exporters, no root and no BPF.

They never skip: a missing Prometheus is a set-up fault (PrometheusMissing names `make setup`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python -m pytest` from the repository root already has the root on sys.path (for
# `tests.support`); the bare `pytest` script does not.
ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
