"""A real Prometheus for tests: start it against scrape targets, query it over its HTTP API, stop it.

khmon's metrics are only right if a real Prometheus scrapes them and its PromQL gives the expected
numbers, so the service tests run the real server (Debian's 2.42, unpacked by `make setup` into
/var/cache/khmon/prometheus, or $KHMON_PROMETHEUS_DIR) rather than parse the exposition themselves.

    with Prometheus(["127.0.0.1:9464"], scrape_interval=1.0) as prom:
        prom.wait_for_scrapes(2)
        assert prom.value("khmon_up") == 1

Prometheus is ready in well under a second, but 2.42 makes its first scrape about 5 s after start
(its discovery manager hands targets on at most every 5 s; no flag changes that): share one instance
across a module's tests where the tests allow it, and wait with wait_for_scrapes, never sleep.
An instant query evaluated "now" extrapolates increase() and rate() past the last sample; evaluate
at the sample's own timestamp (`at=prom.value("timestamp(m)")`) to compare with exact counts.

Each instance gets its own free 127.0.0.1 port and a temporary directory for the config and the
TSDB; both the process and the directory are gone when the `with` block ends, whether or not the
test failed. A query that Prometheus rejects raises QueryError carrying Prometheus's own message. A
failed start raises PrometheusStartError with the tail of Prometheus's log.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

PROMETHEUS_DIR = Path(os.environ.get("KHMON_PROMETHEUS_DIR", "/var/cache/khmon/prometheus"))

T = TypeVar("T")
Time = float | datetime


class PrometheusError(RuntimeError):
    """Anything that went wrong with the test Prometheus."""


class PrometheusMissing(PrometheusError):
    """The binaries are not where `make setup` puts them: a set-up problem, never a reason to skip."""


class PrometheusStartError(PrometheusError):
    """Prometheus exited or never became ready; the message ends with the tail of its log."""


class QueryError(PrometheusError):
    """Prometheus answered a request with status "error" (bad_data for a PromQL parse error)."""

    def __init__(self, path: str, params: dict[str, str], error_type: str, error: str) -> None:
        self.path = path
        self.params = params
        self.error_type = error_type
        self.error = error
        what = params.get("query") or params.get("match[]") or path
        super().__init__(f"Prometheus rejected {what!r}: {error_type}: {error}")


def binary(name: str) -> Path:
    """The unpacked `prometheus` or `promtool`, or PrometheusMissing naming the fix."""
    path = PROMETHEUS_DIR / name
    if not os.access(path, os.X_OK):
        raise PrometheusMissing(
            f"{path} is missing: run `make setup` (it unpacks Debian's prometheus package there)"
        )
    return path


def promtool(*args: str, stdin: str | bytes | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run promtool; (exit code, stdout, stderr). Its lint findings go to stderr, exit 3 for lint."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    r = subprocess.run(
        [str(binary("promtool")), *args], input=data, capture_output=True, timeout=timeout, check=False
    )
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


@dataclass(frozen=True)
class Target:
    """One scrape target. Targets sharing a job must share its scheme, TLS settings and path."""

    address: str  # host:port
    job: str = "test"
    scheme: str = "http"
    metrics_path: str = "/metrics"
    insecure_skip_verify: bool = False  # https against a self-signed certificate
    ca_file: str | None = None


def _duration(seconds: float) -> str:
    """Prometheus's duration syntax; milliseconds so that 0.5 s stays exact."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"duration must be positive, got {seconds} s")
    return f"{ms}ms"


def _timestamp(t: Time) -> str:
    return str(t.timestamp() if isinstance(t, datetime) else float(t))


def _free_port() -> int:
    # The kernel picks a free port; Prometheus binds it a moment later. A port taken in between
    # shows as "address already in use" in its log and start() tries again with another.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if the test process is killed outright (no __exit__ runs), the kernel sends
    # Prometheus SIGTERM instead of leaving it behind holding a port. Tied to the thread that started
    # it: start Prometheus from a thread that outlives it (the main thread, in a test).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Prometheus:
    """A Prometheus server scraping `targets`, for the length of a `with` block.

    targets: "host:port" strings (job "test", plain http) or Target objects.
    scrape_interval: seconds; also the rule evaluation interval, so alerts move at test speed.
    rule_files: paths of rule files (YAML), loaded as Prometheus's rule_files.
    """

    def __init__(
        self,
        targets: Sequence[str | Target],
        *,
        scrape_interval: float = 1.0,
        rule_files: Sequence[str | Path] = (),
        ready_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.scrape_targets = [t if isinstance(t, Target) else Target(t) for t in targets]
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.ready_timeout = ready_timeout
        self.extra_args = list(extra_args)
        self.port = 0
        self.url = ""
        self.ready_seconds = math.nan  # from exec to /-/ready answering 200
        self._proc: subprocess.Popen[bytes] | None = None
        self.directory: Path | None = None  # config, TSDB and log; removed by stop()
        self._log: Path | None = None

    # --- life cycle -----------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The prometheus.yml, as data. Written as JSON, which is YAML: no YAML library needed."""
        jobs: dict[str, dict[str, Any]] = {}
        for t in self.scrape_targets:
            job = jobs.get(t.job)
            settings = {"scheme": t.scheme, "metrics_path": t.metrics_path}
            tls = {k: v for k, v in (("insecure_skip_verify", t.insecure_skip_verify),
                                     ("ca_file", t.ca_file)) if v}
            if tls:
                settings["tls_config"] = tls
            if job is None:
                jobs[t.job] = {"job_name": t.job, **settings, "static_configs": [{"targets": [t.address]}]}
            elif {k: job.get(k) for k in settings} != settings or ("tls_config" in job) != bool(tls):
                raise ValueError(f"targets of job {t.job!r} differ in scheme, path or TLS: give each a job")
            else:
                job["static_configs"][0]["targets"].append(t.address)
        interval = _duration(self.scrape_interval)
        return {
            "global": {"scrape_interval": interval, "scrape_timeout": interval,
                       "evaluation_interval": interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": list(jobs.values()),
        }

    def start(self) -> Prometheus:
        """Write the config, start Prometheus on a free port and wait for /-/ready."""
        exe = binary("prometheus")
        for p in self.rule_files:
            if not p.is_file():
                raise FileNotFoundError(f"rule file {p} does not exist")
        self.directory = Path(tempfile.mkdtemp(prefix="khmon-prometheus-"))
        try:
            cfg = self.directory / "prometheus.yml"
            cfg.write_text(json.dumps(self.config(), indent=2))
            for attempt in range(3):
                if self._start_once(exe, cfg):
                    return self
                if attempt < 2 and "address already in use" not in self.log_tail():
                    break
            raise PrometheusStartError(
                f"Prometheus did not start (config {cfg}):\n{self.log_tail()}"
            )
        except BaseException:
            self.stop()
            raise

    def _start_once(self, exe: Path, cfg: Path) -> bool:
        assert self.directory is not None
        self.stop_process()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = self.directory / "data"
        shutil.rmtree(data, ignore_errors=True)
        self._log = self.directory / "prometheus.log"
        t0 = time.monotonic()
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [str(exe), f"--config.file={cfg}", f"--storage.tsdb.path={data}",
                 f"--web.listen-address=127.0.0.1:{self.port}", *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = t0 + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        self.ready_seconds = time.monotonic() - t0
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop_process()
        with self._log.open("a") as log:
            log.write(f"\n(khmon test harness: not ready after {self.ready_timeout:.0f} s; stopped it)\n")
        return False

    def stop_process(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stop the process and remove the temporary directory (config, TSDB, log). Idempotent."""
        try:
            self.stop_process()
        finally:
            d, self.directory = self.directory, None
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and not isinstance(exc, PrometheusStartError) and self._log is not None:
            # The test failed: its captured stderr shows what Prometheus said, before the log goes.
            sys.stderr.write(f"--- Prometheus log ({self.url}), tail:\n{self.log_tail()}\n")
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines Prometheus logged (its log is logfmt, one record a line)."""
        if self._log is None or not self._log.exists():
            return "(no log)"
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    # --- HTTP API -------------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a success, QueryError (with Prometheus's message) otherwise."""
        if not self.url:
            raise PrometheusError("Prometheus is not started")
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            # 400 bad_data, 422 execution errors, 503 timeouts: the body is still the API's JSON.
            try:
                body = json.loads(e.read())
            except ValueError:
                raise PrometheusError(f"GET {url}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError) as e:
            alive = "running" if self.running else "not running"
            raise PrometheusError(f"GET {url}: {e} (Prometheus is {alive})\n{self.log_tail(10)}") from e
        if body.get("status") != "success":
            raise QueryError(path, params, body.get("errorType", "?"), body.get("error", "?"))
        return body["data"]

    def query(self, expr: str, at: Time | None = None) -> list[Any]:
        """An instant query's result: for a vector, [{"metric": {...}, "value": [t, "v"]}, ...]."""
        params = {"query": expr}
        if at is not None:
            params["time"] = _timestamp(at)
        return self.api("query", **params)["result"]

    def value(self, expr: str, at: Time | None = None) -> float:
        """The one number an instant query gives (a one-series vector or a scalar)."""
        result = self.query(expr, at)
        if result and isinstance(result[0], dict):
            if len(result) != 1:
                raise AssertionError(f"{expr!r} gave {len(result)} series, not one: {result}")
            return float(result[0]["value"][1])
        if len(result) == 2 and not isinstance(result[0], dict):  # a scalar: [t, "v"]
            return float(result[1])
        raise AssertionError(f"{expr!r} gave no sample")

    def query_range(self, expr: str, start: Time, end: Time, step: float | str) -> list[dict[str, Any]]:
        """A range query's matrix: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        return self.api(
            "query_range", query=expr, start=_timestamp(start), end=_timestamp(end),
            step=step if isinstance(step, str) else _duration(step),
        )["result"]

    def label_values(self, name: str) -> list[str]:
        """Every value of a label in the TSDB; `__name__` gives the metric names."""
        return self.api(f"label/{urllib.parse.quote(name, safe='')}/values")

    def series(self, *matchers: str) -> list[dict[str, str]]:
        """The label sets of the series matching any of the selectors."""
        if not matchers:
            raise ValueError("series() needs at least one selector")
        query = urllib.parse.urlencode([("match[]", m) for m in matchers])
        return self.api(f"series?{query}")

    def targets(self) -> list[dict[str, Any]]:
        """Active targets, each with scrapeUrl, labels, health ("up"/"down"/"unknown"), lastError."""
        return self.api("targets", state="active")["activeTargets"]

    def rules(self) -> list[dict[str, Any]]:
        """Rule groups as loaded, each rule with its health, lastError and (for alerts) state."""
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts, with labels, annotations and state."""
        return self.api("alerts")["alerts"]

    # --- waiting --------------------------------------------------------------------------------

    def wait_for(
        self, cond: str | Callable[[], T], timeout: float = 30.0, interval: float = 0.2
    ) -> list[Any] | T:
        """Until `cond` holds: a PromQL expression with a non-empty result (returned), or a
        callable returning something truthy (returned). A rejected query raises at once, since it
        will never start to hold; a timeout raises TimeoutError with the targets' health."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = self.query(cond) if isinstance(cond, str) else cond()
            if last:
                return last
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"after {timeout:.0f} s, {cond if isinstance(cond, str) else cond.__name__!s} "
                    f"still gave {last!r}; targets: {self._target_summary()}"
                )
            time.sleep(interval)

    def wait_for_scrapes(self, n: int = 2, timeout: float = 30.0, job: str | None = None) -> list[Any]:
        """Until every configured target (of `job`) is up and has been scraped at least n times.

        Counts the `up` samples Prometheus writes at each scrape, so "scraped n times" is what the
        TSDB holds, not what the target saw."""
        sel = f'{{job="{job}"}}' if job else ""
        want = sum(1 for t in self.scrape_targets if job is None or t.job == job)
        expr = f"count_over_time(up{sel}[1h]) >= {n} and on (job, instance) up{sel} == 1"

        def all_scraped() -> list[Any]:
            got = self.query(expr)
            return got if len(got) >= want else []

        all_scraped.__name__ = f"{want} target(s) up and scraped {n} times"
        return self.wait_for(all_scraped, timeout)  # type: ignore[return-value]

    def _target_summary(self) -> str:
        try:
            ts = self.targets()
        except PrometheusError as e:
            return f"(cannot list targets: {e})"
        return "; ".join(
            f"{t['scrapeUrl']} {t['health']}" + (f" ({t['lastError']})" if t.get("lastError") else "")
            for t in ts
        ) or "(none)"


def values(result: Iterable[dict[str, Any]], label: str) -> list[str]:
    """One label's values across a query result or series() list, sorted: which series came back."""
    return sorted(r.get("metric", r).get(label, "") for r in result)
