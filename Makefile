# khmon: the two commands a new user needs, on a fresh Debian machine, as root:
#   make demo   set up, then watch khmon explain real khugepaged work on this kernel
#   make test   set up, then run the whole test suite (unit + live BPF tests)
.PHONY: setup demo test test-fast unit live lint bench clean

VENV := .venv
PY := $(VENV)/bin/python
KHMON := $(VENV)/bin/khmon

setup:
	bash scripts/setup.sh

demo: setup
	$(KHMON) doctor --no-trial >/dev/null || $(KHMON) doctor
	$(KHMON) demo

test: setup lint
	$(PY) -m pytest -v tests/unit tests/live

# The same suite without guest kernels (the guest-kernel stages arrive with the VM harness).
test-fast: test

unit: setup
	$(PY) -m pytest -q tests/unit

live: setup
	$(PY) -m pytest -v tests/live

lint: setup
	$(VENV)/bin/ruff check daemon tests bench

bench: setup
	$(PY) bench/replay.py
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
