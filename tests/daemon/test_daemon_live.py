"""`khmon daemon` on the host kernel, checked against ground truth it did not compute: a real
Prometheus 2.42 scraping it every second, the kernel's khugepaged/pages_collapsed, a workload
whose PMDs are known (fully populated: khugepaged collapses every one, smaps says so), and
bpftool's list of loaded programs.

One daemon (with the flight recorder) and one Prometheus serve the module; the TLS and
SIGTERM tests start daemons of their own.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from khmon.kernel import sysfs
from khmon.workload import COMM, Workloads
from tests.support.daemon import KHMON, DaemonHandle, bpf_programs_of, running_daemon
from tests.support.prometheus import Prometheus, Target, promtool

PMDS = 8
# As the demo: fast scans, and max_ptes_none 255 so that half-populated PMDs are refused
FAST = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "100",
        "khugepaged/max_ptes_none": "255"}
SUCCEEDED = 'khmon_collapse_attempts_total{kind=~"anon|file",status="succeeded"}'
PAGES = "khmon_khugepaged_pages_collapsed_total"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass
class Run:
    daemon: DaemonHandle
    prom: Prometheus
    record_dir: Path
    before: float  # Prometheus timestamp of a scrape before the workload started
    after: float  # ... of a scrape after khmon had caught up with the workload's collapses
    workload: dict  # PMDS fully populated PMDs: collapsed
    refused: dict  # PMDS PMDs with the first half populated: refused at the scan


def _sample_times(prom: Prometheus, metric: str, since: float) -> list[float]:
    """Timestamps of the scrapes that stored `metric` since `since` (raw samples)."""
    res = prom.query(f"{metric}[10m]")
    return [float(t) for t, _v in res[0]["values"] if float(t) >= since] if res else []


def _increase(prom: Prometheus, expr: str, start: float, end: float) -> float:
    """increase() over exactly [start, end], both scrape timestamps: evaluated at `end`
    with the range reaching back to `start`, Prometheus has nothing to extrapolate."""
    ms = round((end - start) * 1000)
    return prom.value(f"sum(increase({expr}[{ms}ms]))", at=end)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    rec = tmp_path_factory.mktemp("flight")
    with running_daemon(record_dir=rec) as d, \
            Prometheus([Target(d.address, job="khmon")], scrape_interval=1.0) as prom:
        prom.wait_for_scrapes(2, timeout=60)
        before = _sample_times(prom, PAGES, 0)[-1]
        work = Workloads([["--pmds", str(PMDS), "--pattern", "full"],
                          ["--pmds", str(PMDS), "--pattern", "first-half", "--full-scans", "3"]])
        try:
            with sysfs.override(FAST):
                work()
                deadline = time.monotonic() + 120
                while not work() and time.monotonic() < deadline:
                    time.sleep(0.2)
                result, refused = work.results()
                # khmon's counts lag the kernel's counter by up to a snapshot (1 s): wait
                # for a scrape where both agree, then take that scrape as the window's end
                def caught_up() -> float | None:
                    times = _sample_times(prom, PAGES, before)
                    if len(times) < 3:
                        return None
                    end = times[-1]
                    ok = _increase(prom, SUCCEEDED, before, end) \
                        == _increase(prom, PAGES, before, end) >= PMDS
                    return end if ok else None
                after = prom.wait_for(caught_up, timeout=60)
        finally:
            work.kill()
        yield Run(d, prom, rec, before, after, result, refused)


def test_collapses_counted_by_khmon_equal_the_workload_and_the_kernel(run: Run) -> None:
    prom = run.prom
    assert run.workload["collapsed_pmds"] == PMDS  # smaps: every PMD is a huge page now
    assert run.refused["collapsed_pmds"] == 0
    khmon = _increase(prom, SUCCEEDED, run.before, run.after)
    kernel = _increase(prom, PAGES, run.before, run.after)
    assert khmon == kernel >= PMDS
    # the workload's own share (its comm): exactly its PMDs. Other processes may have had
    # memory collapsed in the window too (a guest's qemu, say): both totals above count them.
    mine = prom.value(f'khmon_process_collapses_total{{comm="{COMM.decode()}"}}', at=run.after)
    assert mine == PMDS


def test_hits_equal_events_plus_lost_per_tracepoint(run: Run) -> None:
    """Exactly, for every tracepoint, once nothing is in flight; pending (repeats the
    in-kernel dedup still holds) is nonzero only for the deduplicated scan events."""
    prom = run.prom
    expr = ("sum by (tracepoint) (khmon_probe_hits_total)"
            " - sum by (tracepoint) (khmon_events_total)"
            " - sum by (tracepoint) (khmon_lost_events_total)"
            " - sum by (tracepoint) (khmon_events_pending)")

    def balanced() -> list:
        res = prom.query(expr)
        return res if res and all(float(r["value"][1]) == 0 for r in res) else []

    res = prom.wait_for(balanced, timeout=30)
    names = {r["metric"]["tracepoint"] for r in res}
    assert "mm_khugepaged_scan_pmd" in names and "mm_collapse_huge_page" in names
    pending = {r["metric"]["tracepoint"]: float(r["value"][1])
               for r in prom.query("khmon_events_pending")}
    hot = {"mm_khugepaged_scan_pmd", "mm_khugepaged_scan_file", "fn_pmd_scan"}
    assert all(v == 0 for name, v in pending.items() if name not in hot), pending
    hits = prom.value('khmon_probe_hits_total{tracepoint="mm_collapse_huge_page"}')
    events = prom.value('khmon_events_total{tracepoint="mm_collapse_huge_page"}')
    assert hits == events >= PMDS


def test_every_probe_is_attached(run: Run) -> None:
    prom = run.prom
    attached = prom.query("khmon_probe_attached")
    assert attached and all(r["value"][1] == "1" for r in attached), attached
    kinds = {r["metric"]["probe"]: r["metric"]["kind"] for r in attached}
    assert kinds["mm_khugepaged_scan_pmd"] == "raw_tracepoint"
    fmts = Path("/sys/kernel/tracing/events/huge_memory")
    want = {p.name for p in fmts.iterdir() if p.name.startswith(("mm_khugepaged", "mm_collapse"))}
    assert want <= set(kinds)
    info = prom.query("khmon_kernel_info")[0]["metric"]
    assert info["release"] == subprocess.run(["uname", "-r"], capture_output=True,
                                             text=True).stdout.strip()
    assert prom.value('khmon_feature_enabled{feature="flight_recorder"}') == 1
    assert prom.query('khmon_scrape_collector_success != 1') == []


def test_exposition_in_both_formats_passes_promtool(run: Run) -> None:
    text = run.daemon.metrics()
    rc, out, err = promtool("check", "metrics", stdin=text)
    assert rc == 0, out + err
    om = run.daemon.metrics(accept=OPENMETRICS)
    assert om.endswith("# EOF\n") and "_created" not in om and "_created" not in text
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    # promtool 2.42 reads only the text format: the OpenMetrics exposition goes through
    # prometheus_client's OpenMetrics parser, which follows the spec strictly (# EOF, counter
    # families named without _total, escaping), and must hold the same families
    om_names = {f.name for f in text_string_to_metric_families(om)}
    text_names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert om_names == {n.removesuffix("_total") for n in text_names}
    assert {"khmon_collapse_attempts", "khmon_probe_hits", "khmon_vmstat_thp_collapse_alloc",
            "khmon_khugepaged_scan_sleep_seconds"} <= om_names


def test_socket_api_and_report_daemon(run: Run) -> None:
    d = run.daemon
    snap = d.request({"req": "snapshot", "top": 200})
    assert snap["ok"] and snap["seq"] >= 1
    p = subprocess.run([str(KHMON), "report", str(run.record_dir / "current.khrec"), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert set(snap["report"]) == set(json.loads(p.stdout))  # the keys of report --json
    # The refused workload's PMDs have records (its process is kept 60 s after it exits),
    # each with the bitmap pagemap read on this kernel: the first half of the PTEs.
    start, pid = int(run.refused["start"], 16), run.refused["pid"]
    records = [d.request({"req": "pmd", "pid": pid, "address": hex(start + i * (2 << 20))})
               for i in range(PMDS)]
    found = [r["pmd"] for r in records if r["ok"]]
    assert found, records
    assert all(not r["ok"] and r["error"] == "no such PMD record" for r in records
               if not r["ok"])
    for rec in found:
        assert rec["pid"] == pid and rec["verdict"] == "exceed_none_pte"
        if rec["bitmap_source"] == "pagemap":
            assert rec["present"] == 256
    assert any(rec["bitmap_source"] == "pagemap" for rec in found)
    text = subprocess.run([str(KHMON), "report", "--daemon", "--socket", str(d.socket)],
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "khmon report: kernel" in text.stdout and "from the khmon daemon" in text.stdout


def test_flight_recorder_new_file_on_sighup_and_reads_while_written(run: Run) -> None:
    d = run.daemon
    first = (run.record_dir / "current.khrec").resolve()
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10

    def rotated() -> bool:  # current.khrec is re-pointed just before the line is logged
        now = (run.record_dir / "current.khrec").resolve()
        return now != first and f"flight recorder: now writing {now}" in d.stderr_text()
    while not rotated() and time.monotonic() < deadline:
        time.sleep(0.1)
    second = (run.record_dir / "current.khrec").resolve()
    assert rotated(), (first, second, d.stderr_text()[-2000:])
    old = json.loads(subprocess.run([str(KHMON), "report", str(first), "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    assert old["window"]["complete"] and not old["warnings"]
    assert old["collapse"]["succeeded"] >= PMDS  # the workload ran in the first file's window
    for name, a in old["accounting"].items():
        # each file's counts are rebased to its own window: what was seen is recorded or
        # lost, except repeats the dedup held across the boundary (they land in the next)
        assert a["unaccounted"] >= 0 and a["recorded"] + a["lost"] <= a["seen"] + a["records"], \
            (name, a)
    new = subprocess.run([str(KHMON), "report", str(second)], capture_output=True, text=True)
    assert new.returncode == 0, new.stderr  # the file being written reads


def test_tls_endpoint_scraped_by_prometheus(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with running_daemon("--tls-cert", str(cert), "--tls-key", str(key),
                        ca_file=str(cert)) as d, \
            Prometheus([Target(d.address, job="khmon-tls", scheme="https",
                               ca_file=str(cert))], scrape_interval=1.0) as prom:
        assert "khmon_build_info" in d.metrics()
        prom.wait_for_scrapes(1, timeout=60)
        assert prom.value('khmon_feature_enabled{feature="tls"}') == 1
        assert prom.value('up{job="khmon-tls"}') == 1


def test_sigterm_exits_0_within_10s_and_unloads_its_programs() -> None:
    with running_daemon() as d:
        mine = bpf_programs_of(d.pid)
        assert mine, "bpftool lists the daemon's programs while it runs"
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(10)
        took = time.monotonic() - t0
        assert "khmon: stopped after" in d.stderr_text()
        assert not d.socket.exists()
    assert rc == 0 and took < 10
    left = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True,
                                     text=True, check=True).stdout)
    assert not mine & {p["id"] for p in left}, "programs of the daemon still loaded"


def _accounting(d: DaemonHandle) -> dict[str, dict[str, float]]:
    """hits, events, lost and pending per tracepoint from one exposition."""
    out: dict[str, dict[str, float]] = {}
    for line in d.metrics().splitlines():
        m = re.match(r'^khmon_(probe_hits_total|events_total|lost_events_total|events_pending)'
                     r'\{.*tracepoint="([^"]+)".*\} (\S+)$', line)
        if m:
            row = out.setdefault(m.group(2), {})
            row[m.group(1)] = row.get(m.group(1), 0.0) + float(m.group(3))
    return out


def test_losses_are_counted_logged_and_balance() -> None:
    """A one-page ring buffer under khugepaged at full speed loses records: the losses are
    counted (hits = events + lost + pending still holds), and the log says when they start
    and when they stop."""
    full_speed = {"enabled": "madvise", "khugepaged/scan_sleep_millisecs": "0",
                  "khugepaged/pages_to_scan": "65536", "khugepaged/max_ptes_none": "0"}
    with running_daemon("--ringbuf-pages", "1", "--dedup-slots", "4") as d:
        work = Workloads([["--pmds", "512", "--pattern", "one-page", "--timeout", "0",
                           "--hold", "600"]])
        try:
            with sysfs.override(full_speed):
                work()
                deadline = time.monotonic() + 30
                while "losing events" not in d.stderr_text():
                    assert time.monotonic() < deadline, d.stderr_text()
                    time.sleep(0.2)
        finally:
            work.kill()
        deadline = time.monotonic() + 60  # the loss episode ends 10 s after the last loss
        while "no events lost for 10 s" not in d.stderr_text():
            assert time.monotonic() < deadline, d.stderr_text()
            time.sleep(0.5)
        acc = _accounting(d)
        assert sum(a["lost_events_total"] for a in acc.values()) > 0
        for name, a in acc.items():
            assert a["probe_hits_total"] == a["events_total"] + a["lost_events_total"] \
                + a["events_pending"], (name, a)
        log = d.stderr_text()
        assert log.count("losing events") == 1 and "the in-kernel counts stay exact" in log
