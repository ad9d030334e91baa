"""`khmon daemon`: attach once, run until stopped; Prometheus metrics, the socket API, the
flight recorder, and systemd's notify protocol around one live pipeline.

The wiring, in the order it happens:
  1. the metrics endpoint and the socket are bound first, so a taken port or a bad path
     fails at once and not after a compile that takes a minute in a TCG guest;
  2. the probes are compiled and attached (khmon.capture.live.LiveCapture); a probe that
     fails to attach is logged and exported as khmon_probe_attached 0, and the daemon runs
     without it;
  3. the pipeline's worker (khmon.pipeline.LivePipeline) drains the ring buffer into the
     model and, with --record-dir, into the flight recorder (khmon.stream.flight);
  4. READY=1 goes to systemd once the first snapshot is out (the endpoint then has every
     family); from then on the main thread pings the watchdog while the worker keeps
     publishing snapshots (a worker that stops draining stops the pings, and systemd
     restarts the service), updates STATUS=, and logs state changes;
  5. SIGTERM or SIGINT: STOPPING=1, the probes are detached and drained, the recording's
     end part written, the endpoint and socket closed; exit 0. SIGHUP starts a new
     recording file.

Every option can also come from the environment (the unit's EnvironmentFile,
systemd/khmon.env): --listen is KHMON_LISTEN, and so on, as `khmon daemon --help` shows.
"""

from __future__ import annotations

import faulthandler
import ipaddress
import platform
import signal
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from .capture.bpfgen import ProbeConfig
from .errors import EXIT_BAD_INPUT, EXIT_FAIL, KhmonError
from .kernel.sysfs import selected
from .model.correlate import DEFAULT_PMD_CAP
from .service.client import DEFAULT_SOCKET

DEFAULT_PORT = 10464  # see README, "The daemon": 9100-9999 of Prometheus's registry is full
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_RECORD_MAX = "1G"
MIN_RECORD_MAX = 8 << 20
# PMD records held (khmon.model.correlate), for the daemon and the commands alike.
MAX_PMDS = (100, 10_000_000)
MAX_PMDS_HELP = ("PMD records kept, about 750 bytes each (the default: about 75 MB); beyond "
                 "it the least recently active go, counted as evicted (counts and waste "
                 "totals keep what they saw).")
EXIT_GRACE_S = 60.0  # an exited process's records stay this long, then are forgotten
STATUS_EVERY_S = 5.0
LOSS_QUIET_S = 10.0  # no new loss for this long ends a "losing events" episode


def parse_listen(value: str) -> tuple[str, int]:
    """ADDR:PORT, [IPv6]:PORT -> (address, port); KhmonError (bad input) otherwise."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise KhmonError(f"--listen {value!r} is not ADDR:PORT", f"e.g. --listen "
                         f"{DEFAULT_LISTEN}, 0.0.0.0:{DEFAULT_PORT} or [::1]:{DEFAULT_PORT}",
                         EXIT_BAD_INPUT) from None
    return host, int(port)


def parse_size(value: str) -> int:
    """A byte count: 1073741824, 512M, 1G, 64k (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    v = value.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(v[-1:], 1)
    digits = v[:-1] if v[-1:] in units else v
    if not digits.isdigit():
        raise KhmonError(f"--record-max-bytes {value!r} is not a size", "e.g. 1G, 512M or "
                         "1073741824", EXIT_BAD_INPUT)
    return int(digits) * mult


@dataclass(frozen=True)
class Options:
    """The daemon's options, validated."""

    listen: tuple[str, int]
    tls: tuple[Path, Path] | None
    socket: Path
    record_dir: Path | None
    record_max_bytes: int
    max_process_labels: int
    max_pmds: int


def _path_opt(value: Path | None) -> Path | None:
    """An empty value (KHMON_RECORD_DIR= in the environment file) means "not given"."""
    return value if value is not None and str(value) not in ("", ".") else None


def command(
    listen: Annotated[str, typer.Option(
        "--listen", envvar="KHMON_LISTEN", help="Address and port of the Prometheus endpoint "
        f"(port {DEFAULT_PORT}: see README). 0.0.0.0:PORT to be scraped from elsewhere.")]
    = DEFAULT_LISTEN,
    tls_cert: Annotated[Path | None, typer.Option(
        "--tls-cert", envvar="KHMON_TLS_CERT", help="Serve the endpoint over HTTPS with this "
        "certificate (PEM; with --tls-key).")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        "--tls-key", envvar="KHMON_TLS_KEY", help="The certificate's private key (PEM).")]
    = None,
    socket: Annotated[Path, typer.Option(
        "--socket", envvar="KHMON_SOCKET", help="The Unix socket of the local API "
        "(docs/socket.md): khmon report --daemon and khmon top read it.")] = DEFAULT_SOCKET,
    record_dir: Annotated[Path | None, typer.Option(
        "--record-dir", envvar="KHMON_RECORD_DIR", help="Keep the stream as khmon recordings "
        "in this directory (the flight recorder; SIGHUP starts a new file).")] = None,
    record_max_bytes: Annotated[str, typer.Option(
        "--record-max-bytes", envvar="KHMON_RECORD_MAX_BYTES", help="Cap on the recordings "
        "kept in --record-dir (oldest removed first), e.g. 1G, 512M.")] = DEFAULT_RECORD_MAX,
    pid: Annotated[int, typer.Option(
        "--pid", "-p", envvar="KHMON_PID", min=0, help="Only events whose mm belongs to this "
        "process (or collapsed by one of its threads); 0: all.")] = 0,
    max_process_labels: Annotated[int, typer.Option(
        "--max-process-labels", envvar="KHMON_MAX_PROCESS_LABELS", min=1, max=10000,
        help='Distinct comm labels in per-process metrics; later comms count as comm="other".')]
    = 32,
    max_pmds: Annotated[int, typer.Option(
        "--max-pmds", envvar="KHMON_MAX_PMDS", min=MAX_PMDS[0], max=MAX_PMDS[1],
        help=MAX_PMDS_HELP)] = DEFAULT_PMD_CAP,
    ringbuf_pages: Annotated[int, typer.Option(
        "--ringbuf-pages", envvar="KHMON_RINGBUF_PAGES", min=1,
        help="Ring buffer size in pages (a power of two).")] = 1024,
    dedup_slots: Annotated[int, typer.Option(
        "--dedup-slots", envvar="KHMON_DEDUP_SLOTS", min=4, max=1 << 20,
        help="Dedup slots per CPU for each scan event (a power of two, 4 to 1048576).")]
    = 32768,
) -> None:
    """Run khmon as a service: attach once, export Prometheus metrics, serve the local
    socket API, keep a flight recording, until SIGTERM.

    Under systemd (Type=notify) it sends READY=1 once attached, WATCHDOG=1 while its
    pipeline drains, STATUS= with events/s and lost events, STOPPING=1 on SIGTERM. Logs one
    line per state change on stderr. Exits 0 when stopped, 1 when the kernel or the machine
    cannot do it, 2 for bad options.
    """
    from .cli import _config, _guard

    def body() -> None:
        if (tls_cert is None) != (tls_key is None):
            raise KhmonError("--tls-cert and --tls-key go together", "give both, or neither",
                             EXIT_BAD_INPUT)
        for opt, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if path is not None and not path.is_file():
                raise KhmonError(f"{opt} {path}: no such file", "give a PEM file",
                                 EXIT_BAD_INPUT)
        record = _path_opt(record_dir)
        cap = parse_size(record_max_bytes)
        if record is not None and cap < MIN_RECORD_MAX:
            raise KhmonError(f"--record-max-bytes {record_max_bytes} is below 8M",
                             "give 8M or more (files rotate at an eighth of it)",
                             EXIT_BAD_INPUT)
        cfg = _config(pid, ringbuf_pages, dedup_slots)
        opts = Options(parse_listen(listen),
                       (tls_cert, tls_key) if tls_cert is not None and tls_key is not None
                       else None, socket, record, cap, max_process_labels, max_pmds)
        Daemon(opts, cfg).run()

    _guard(body)


class Daemon:
    """One run of the service; run() returns when it was told to stop."""

    def __init__(self, opts: Options, cfg: ProbeConfig) -> None:
        from .service.log import daemon_logger
        from .service.sdnotify import Notifier

        self.opts = opts
        self.cfg = cfg
        self.log = daemon_logger()
        self.notify = Notifier()
        self.stopping = False
        self.pipeline: Any = None
        self._started = False
        self.recorder: Any = None
        self.http: Any = None
        self.api: Any = None
        # state the main loop compares snapshot to snapshot
        self._last_seq = 0
        self._last_progress = time.monotonic()
        self._last_ping = 0.0
        self._last_status = 0.0
        self._status_seen: tuple[float, int] | None = None
        self._losing_since: float | None = None
        self._lost_at_start = 0
        self._last_lost = 0
        self._last_loss_t = 0.0
        self._settings: dict[str, str] | None = None
        self._labels_spent = False
        self._slow_logged = False

    # --- life cycle -------------------------------------------------------------------------

    def run(self) -> None:
        faulthandler.enable()  # a watchdog SIGABRT dumps every thread's stack to the journal
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._hup)
        t0 = time.monotonic()
        try:
            self._serve_early()
            self._attach()
            if self.stopping:
                return
            # Ready means attached and publishing: the first snapshot comes with the first
            # stats part, a second after the worker starts (an error ends the wait too).
            while self.pipeline.snapshot is None and not self.pipeline.done.wait(0.05) \
                    and not self.stopping:
                pass
            self.notify.ready(f"attached in {time.monotonic() - t0:.1f} s")
            self.pipeline.wait(lambda: self.stopping, tick=0.5, on_tick=self._tick)
            snap = self.pipeline.snapshot
            if snap is not None:
                r = snap.report
                seen = sum(a["seen"] for a in r["accounting"].values())
                self.log.info(f"stopped after {r['window']['seconds']:.0f} s: {seen} events, "
                              f"{r['lost_events']} lost")
        finally:
            self._shutdown()

    def _stop(self, *_: object) -> None:
        if not self.stopping:
            self.stopping = True
            self.notify.stopping()

    def _hup(self, *_: object) -> None:
        if self.recorder is not None:
            self.recorder.rotate_soon()

    def _serve_early(self) -> None:
        """Bind the endpoint and the socket before the long compile: a bad address fails now.
        Until the first snapshot the endpoint serves build info and the kernel's counters,
        and the socket answers hello."""
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        from .outputs.metrics import KernelCollector, ServiceCollector, Timed
        from .service.api import ApiServer

        registry = CollectorRegistry(auto_describe=False)
        self.collectors = Timed({"kernel": KernelCollector(),
                                 "service": ServiceCollector(self._service_metrics)})
        registry.register(self.collectors)
        ProcessCollector(registry=registry)
        host, port = self.opts.listen
        tls = self.opts.tls
        try:
            self.http, _thread = start_http_server(
                port, addr=host, registry=registry,
                certfile=str(tls[0]) if tls else None, keyfile=str(tls[1]) if tls else None)
        except ssl.SSLError as e:
            raise KhmonError(f"cannot use --tls-cert/--tls-key: {e.reason or e}",
                             "give a PEM certificate and its key", EXIT_BAD_INPUT) from e
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or str(e)
            raise KhmonError(f"cannot listen on {host}:{port}: {why}",
                             "choose another --listen (is another khmon running?)",
                             EXIT_FAIL) from e
        self.api = ApiServer(self.opts.socket, self._latest, self._pmd, platform.release(),
                             process_pmds=self._process_pmds).start()
        self.api.on_disconnect = self._client_dropped

    def _attach(self) -> None:
        from .capture.live import LiveCapture
        from .capture.loader import bcc_version
        from .outputs.metrics import DaemonFacts, SnapshotCollector, probe_kinds
        from .pipeline import LivePipeline
        from .service.api import TOP_MAX
        from .stream.flight import FlightRecorder

        t0 = time.monotonic()
        cap = LiveCapture(self.cfg)
        if self.stopping:  # told to stop while compiling
            cap.probes.close()
            return
        self.pipeline = LivePipeline(cap, None, None, snapshot_top=TOP_MAX,
                                     exit_grace_s=EXIT_GRACE_S,
                                     process_labels=self.opts.max_process_labels,
                                     pmd_cap=self.opts.max_pmds)
        header = self.pipeline.header
        if self.opts.record_dir is not None:
            try:
                self.recorder = FlightRecorder(self.opts.record_dir,
                                               self.opts.record_max_bytes, header,
                                               log=self.log.info)
            except BaseException:
                cap.probes.close()
                raise
            self.pipeline.writer = self.recorder
        facts = DaemonFacts(header, bcc_version(), {"flight_recorder": self.recorder is not None,
                                                    "tls": self.opts.tls is not None})
        # a new dict, not an update: a scrape in progress keeps iterating the old one
        self.collectors.collectors = {"snapshot": SnapshotCollector(self._latest, facts),
                                      **self.collectors.collectors}
        kinds = probe_kinds(header)
        ok = [n for n, err in header["attached"].items() if err is None]
        fp = header["function_probes"]
        scheme = "https" if self.opts.tls else "http"
        host, port = self.opts.listen
        by_kind = Counter(kinds.get(n, "tracepoint") for n in ok)
        self.log.info(
            f"attached to {len(ok)} probes in {time.monotonic() - t0:.1f} s ("
            + ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items())) + "); "
            f"metrics on {scheme}://{_hostport(host, port)}/metrics, socket {self.opts.socket}"
            + (f", recording to {self.recorder.path}" if self.recorder else ""))
        for name, err in header["attached"].items():
            if err is not None:
                self.log.warning(f"probe {name} ({kinds.get(name, 'tracepoint')}) not "
                                 f"attached: {err}; running without it")
        for mode, err in (fp.get("refused") or {}).items():
            self.log.warning(f"function probes ({mode or 'attach'}) refused: {err}")
        self.pipeline.start()
        self._started = True

    def _shutdown(self) -> None:
        if self._started and not self.pipeline.done.is_set():  # an error between start and wait
            self.pipeline.stop()
            self.pipeline.done.wait(30)
        elif self.pipeline is not None and not self._started:
            self.pipeline.cap.probes.close()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.api is not None:
            self.api.stop()
        self.notify.close()

    # --- what the endpoint and the socket read ----------------------------------------------

    def _latest(self) -> Any:
        return self.pipeline.snapshot if self.pipeline is not None else None

    def _pmd(self, pid: int, address: int) -> dict[str, Any] | None:
        if self.pipeline is None:
            return None
        return self.pipeline.call(lambda m: m.pmd_json(pid, address))

    def _process_pmds(self, pid: int, top: int) -> list[dict[str, Any]]:
        from .topfeed import pmds_of  # khmon top's own feed answers the same request

        if self.pipeline is None:
            return []
        return self.pipeline.call(lambda m: pmds_of(m, pid, top))

    def _service_metrics(self) -> Any:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        api = self.api
        if api is not None:
            yield GaugeMetricFamily("khmon_api_clients", "Clients connected to the socket API.",
                                    value=api.clients)
            c = CounterMetricFamily("khmon_api_requests", "Socket API requests by kind (bad: "
                                    "not a known request).", labels=["req"])
            for k, v in sorted(api.requests.items()):
                c.add_metric([k], v)
            yield c
            c = CounterMetricFamily("khmon_api_disconnects", "Clients the socket API "
                                    "disconnected: slow_reader (its output buffer was full), "
                                    "line_too_long, too_many_clients, error (a khmon bug "
                                    "answering it; the log has the first).", labels=["reason"])
            for k, v in sorted(api.disconnects.items()):
                c.add_metric([k], v)
            yield c
        rec = self.recorder
        if rec is not None:
            yield GaugeMetricFamily("khmon_flight_recorder_bytes", "Bytes of khmon recordings "
                                    "kept in --record-dir.", value=rec.kept_bytes())
            yield GaugeMetricFamily("khmon_flight_recorder_files", "khmon recordings kept in "
                                    "--record-dir.", value=len(rec.kept()))
            yield CounterMetricFamily("khmon_flight_recorder_written_bytes", "Bytes the flight "
                                      "recorder wrote since the daemon started.",
                                      value=rec.bytes_written)
            yield CounterMetricFamily("khmon_flight_recorder_rotations", "New recording files "
                                      "started (by size or SIGHUP).", value=rec.rotations)
            yield CounterMetricFamily("khmon_flight_recorder_removed_files", "Old recordings "
                                      "removed to stay under --record-max-bytes.",
                                      value=rec.removed)
            yield CounterMetricFamily("khmon_flight_recorder_write_errors", "Writes that failed "
                                      "(the recording stops, and restarts 60 s later).",
                                      value=rec.write_errors)

    # --- the main loop ----------------------------------------------------------------------

    def _tick(self, pipeline: Any) -> None:
        now = time.monotonic()
        snap = pipeline.snapshot
        if snap is not None and snap.seq != self._last_seq:
            self._last_seq = snap.seq
            self._last_progress = now
            self._changes(snap.report, now)
        wd = self.notify.watchdog_s
        # Ping only while the worker publishes snapshots (once a second): a worker that
        # stopped draining stops the pings, and systemd restarts the service.
        if wd and now - self._last_progress < max(3.0, wd / 2) and now - self._last_ping >= wd / 4:
            self.notify.watchdog()
            self._last_ping = now
        if snap is not None and now - self._last_status >= STATUS_EVERY_S:
            self._last_status = now
            seen = sum(a["seen"] for a in snap.report["accounting"].values())
            rate = ""
            if self._status_seen is not None:
                t, n = self._status_seen
                rate = f"{(seen - n) / max(now - t, 1e-3):,.0f} events/s, "
            self._status_seen = (now, seen)
            self.notify.status(f"{rate}{snap.report['lost_events']:,} lost; "
                               f"{snap.processes_total} processes, {snap.pmds_total} PMDs")

    def _changes(self, r: dict[str, Any], now: float) -> None:
        """Log what changed since the last snapshot: losses starting and stopping, knobs,
        the comm label budget running out."""
        lost = r["lost_events"]
        if lost > self._last_lost:
            if self._losing_since is None:
                self._losing_since, self._lost_at_start = now, self._last_lost
                by = {name: a["lost"] + a["missed"] for name, a in r["accounting"].items()
                      if a["lost"] + a["missed"]}
                self.log.warning(f"losing events: {lost - self._last_lost} lost in the last "
                                 f"second ({', '.join(f'{k} {v}' for k, v in by.items())} in all)"
                                 "; the in-kernel counts stay exact")
            self._last_loss_t = now
        elif self._losing_since is not None and now - self._last_loss_t >= LOSS_QUIET_S:
            self.log.info(f"no events lost for {LOSS_QUIET_S:.0f} s ({lost - self._lost_at_start}"
                          f" lost over {self._last_loss_t - self._losing_since + 1:.0f} s)")
            self._losing_since = None
        self._last_lost = lost
        settings = r["settings"]
        if self._settings is not None and settings != self._settings:
            for k in sorted(set(settings) | set(self._settings)):
                old, new = self._settings.get(k), settings.get(k)
                if old != new:
                    self.log.info(f"setting changed: {k} "
                                  f"{selected(old) if old else '(absent)'} -> "
                                  f"{selected(new) if new else '(absent)'}")
        self._settings = settings
        if not self._labels_spent and r["model"]["process_label_overflow"]:
            self._labels_spent = True
            self.log.info(f"process label budget spent ({r['model']['process_labels']} comms): "
                          'new comms count under comm="other"')

    def _client_dropped(self, why: str) -> None:
        if not self._slow_logged:  # once: a misbehaving client must not flood the journal
            self._slow_logged = True
            self.log.warning(f"socket API: disconnected a client ({why}); further ones are "
                             "only counted (khmon_api_disconnects_total)")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
