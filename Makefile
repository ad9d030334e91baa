# khmon: the two commands a new user needs, on a fresh Debian machine, as root:
#   make demo   set up, then watch khmon explain real khugepaged work on this kernel
#   make test   set up, then run the whole test suite (unit + live BPF tests)
.PHONY: setup demo test test-fast unit live lint bench vm dashboards install-service clean

VENV := .venv
PY := $(VENV)/bin/python
KHMON := $(VENV)/bin/khmon

setup:
	bash scripts/setup.sh

demo: setup
	$(KHMON) doctor --no-trial >/dev/null || $(KHMON) doctor
	$(KHMON) demo

# Stages: lint, unit, live on this kernel, then the live suite inside Debian 6.1 and 7.2+
# guest kernels (QEMU/TCG; downloaded into /var/cache/khmon on first use). Timing summary
# at the end.
test: setup
	scripts/test.sh

# The same without the guest kernels.
test-fast: setup
	scripts/test.sh --fast

# Boot a guest kernel with this checkout and run a command as root in it:
#   make vm KERNEL=7.2 CMD='.venv/bin/khmon doctor'
KERNEL ?= 7.2
CMD ?= uname -r
export CMD
vm: setup
	tests/vm/run.sh "$(KERNEL)" "$$CMD"

unit: setup
	$(PY) -m pytest -q tests/unit

live: setup
	$(PY) -m pytest -v tests/live

lint: setup
	$(VENV)/bin/ruff check daemon tests bench dashboards
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(PY) bench/replay.py
	$(PY) bench/soak.py
	$(PY) bench/overhead.py --pin auto
	$(PY) bench/top_frame.py
	$(PY) bench/bitmap_cost.py

# Regenerate the Grafana dashboards, alert rules and provisioning files under dashboards/ from
# their generator (dashboards/*.py, grafana-foundation-sdk); the service tests fail until the
# regenerated files are committed.
dashboards: setup
	$(PY) -m dashboards.generate

# The systemd service for this checkout: /etc/systemd/system/khmon.service (ExecStart in
# this checkout's venv) and its options in /etc/default/khmon; systemd reloaded where it
# runs. Then: systemctl enable --now khmon
install-service:
	scripts/install-service.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
