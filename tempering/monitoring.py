"""Monitoring for plant IT: Prometheus metrics (``/metrics``) and a health check (``/healthz``)
over HTTP, served by the plant window — never by the PLC, whose scan it cannot slow down.

    PLC scan ─snapshot (stats with histogram buckets), link diagnostics─► PlcClient (window)
    scrape ─► HTTP thread ─► TemperingCollector.collect(): reads the latest snapshot, the link
              diagnostics, the historian, the OPC UA server at that moment ─► text exposition

Rules:
- Nothing is computed between scrapes: the collector reads what the window already holds
  (``Sources``); a scrape costs the window one short GIL hold in its own thread, and the PLC
  nothing.
- One machine per target. Series carry no ``machine`` label: the target is the machine
  (Prometheus's "target labels, not static scraped labels"); ``tempering_machine_info`` says
  which one (``machine_id``, ``machine_name``), and the scrape config gives the target its
  ``machine`` label (README, Monitoring).
- ``health(sources)`` is pure: 200 ``{"status": "ok"}`` while the PLC's snapshots arrive
  (scanning, window connected), no watchdog trip is latched, the scan's lateness p99 stays
  within its period and every link and unit answers; otherwise 503 with every problem.
- A port that cannot be bound stops only the monitoring (``MetricsServer.start`` raises
  OSError; the window logs it and goes on).
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.process_collector import ProcessCollector

from opcua_server.batches import VERDICTS
from plc.alarms import Priority
from plc.runtime import SCAN_BUCKETS_S, bucket_key



@dataclass
class Sources:
    """What a scrape reads, each a callable the window already has (any may be left out)."""

    machine: str
    name: str = ""
    period_s: float = 0.1
    snapshot: Callable[[], Any] = lambda: None          # plc.channel.Snapshot | None
    plc_status: Callable[[], str] = lambda: ""          # PlcClient.status(): '' = scanning
    plc_pid: Callable[[], int | None] = lambda: None
    plc_dropped: Callable[[], int] = lambda: 0          # snapshots the PLC replaced unsent
    links: Callable[[], tuple] = lambda: ()             # plc.modbus.link.LinkDiagnostics
    history: Callable[[], Any] = lambda: None           # historian.service.HistorianDiagnostics
    sessions: Callable[[], tuple[int, int]] | None = None   # OPC UA (sessions, subscriptions)
    batches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))

    def judged(self, record) -> None:
        """A batch record judged by the window (``BatchRecord.verdict``): counted."""
        self.batches[record.verdict] = self.batches.get(record.verdict, 0) + 1


def unit_up(d) -> bool:
    """A unit is up while it answers: connected, and its last poll had a valid reply (a unit is
    only demoted after ``demote_after`` failed polls, seconds later on a slow line)."""
    return d.state == "connected" and d.consecutive_failures == 0


def _histogram(name: str, doc: str, stats: Mapping[str, float], what: str) -> HistogramMetricFamily | None:
    keys = [bucket_key(what, le) for le in SCAN_BUCKETS_S]
    if any(k not in stats for k in keys):
        return None
    buckets = [(f"{le:g}", stats[k]) for le, k in zip(SCAN_BUCKETS_S, keys)]
    buckets.append(("+Inf", stats.get("scans", 0.0)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=stats.get(f"{what}_s_sum", 0.0))


class TemperingCollector:
    """The machine's metrics, read from ``Sources`` at scrape time (a prometheus_client custom
    collector). Names follow Prometheus's conventions: ``tempering_`` prefix, base units
    (seconds, ratios), ``_total`` counters."""

    def __init__(self, sources: Sources):
        self.s = sources

    def describe(self) -> Iterable:
        return ()             # nothing at registration: collect() reads live sources

    def collect(self) -> Iterable:
        s = self.s
        info = GaugeMetricFamily("tempering_machine_info", "The machine this target is (always 1)",
                                 labels=["machine_id", "machine_name"])   # `machine`: the target's
        info.add_metric([s.machine, s.name], 1)
        yield info
        status = s.plc_status()
        yield GaugeMetricFamily("tempering_plc_up", "1 while the PLC is connected and its snapshots "
                                "arrive", value=0 if status else 1)
        yield CounterMetricFamily("tempering_plc_snapshots_dropped", "Snapshots the PLC replaced "
                                  "before the window took them", value=s.plc_dropped())
        snap = s.snapshot()
        if snap is not None:
            yield from self._scan(snap)
            yield from self._alarms(snap)
        yield from self._links(s.links())
        yield from self._history(s.history())
        if s.sessions is not None:
            sessions, subscriptions = s.sessions()
            yield GaugeMetricFamily("tempering_opcua_sessions", "OPC UA sessions open", value=sessions)
            yield GaugeMetricFamily("tempering_opcua_subscriptions", "OPC UA subscriptions",
                                    value=subscriptions)
        batches = CounterMetricFamily("tempering_batches", "Batch records judged by this window "
                                      "since it started, by verdict", labels=["verdict"])
        for verdict, n in s.batches.items():
            batches.add_metric([verdict], n)
        yield batches

    def _scan(self, snap) -> Iterable:
        st = snap.stats or {}
        yield GaugeMetricFamily("tempering_scan_period_seconds", "The scan's period",
                                value=self.s.period_s)
        for name, what, doc in (("tempering_scan_lateness_seconds", "late",
                                 "Scan start after its deadline, since the PLC started"),
                                ("tempering_scan_logic_seconds", "logic",
                                 "Scan time from reading the inputs to writing the outputs")):
            h = _histogram(name, doc, st, what)
            if h is not None:
                yield h
        yield CounterMetricFamily("tempering_scan_overruns", "Scans that finished after their "
                                  "next deadline", value=st.get("overruns", 0.0))
        yield CounterMetricFamily("tempering_scan_skipped_deadlines", "Deadlines skipped after "
                                  "an overrun", value=st.get("skipped_deadlines", 0.0))
        yield GaugeMetricFamily("tempering_scan_lateness_p99_seconds", "Lateness p99 over the "
                                "last 3000 scans", value=st.get("late_ms_p99", 0.0) / 1e3)
        yield GaugeMetricFamily("tempering_interlock_trips", "Interlock trips latched",
                                value=len(snap.trips))

    def _alarms(self, snap) -> Iterable:
        active = GaugeMetricFamily("tempering_alarms_active", "Alarms whose condition is active, "
                                   "by ISA-18.2 priority", labels=["priority"])
        unacked = GaugeMetricFamily("tempering_alarms_unacknowledged", "Alarms not acknowledged, "
                                    "by priority", labels=["priority"])
        for p in Priority:
            active.add_metric([p.name.lower()], sum(1 for a in snap.alarms if a.active and a.priority == p))
            unacked.add_metric([p.name.lower()], sum(1 for a in snap.alarms if not a.acked and a.priority == p))
        yield active
        yield unacked

    def _links(self, links: tuple) -> Iterable:
        link_up = GaugeMetricFamily("tempering_modbus_link_up", "1 while the link's connection is "
                                    "up", labels=["link"])
        reconnects = CounterMetricFamily("tempering_modbus_reconnects", "Reconnections of the link",
                                         labels=["link"])
        units = GaugeMetricFamily("tempering_modbus_unit_up", "1 while the unit answers (0: its "
                                  "last poll failed, or it is down or demoted)", labels=["link", "unit"])
        requests = CounterMetricFamily("tempering_modbus_requests", "Modbus requests sent",
                                       labels=["link", "unit"])
        errors = CounterMetricFamily("tempering_modbus_errors", "Failed requests by kind (timeout, "
                                     "exception, garbage, disconnect)", labels=["link", "unit", "kind"])
        rtt = GaugeMetricFamily("tempering_modbus_round_trip_seconds", "Request round trip, "
                                "quantile over the last 2000 requests", labels=["link", "unit", "quantile"])
        for link in links:
            link_up.add_metric([link.name], 1 if link.state == "connected" else 0)
            reconnects.add_metric([link.name], link.reconnects)
            for d in link.devices:
                unit = str(d.unit)
                units.add_metric([link.name, unit], 1 if unit_up(d) else 0)
                requests.add_metric([link.name, unit], d.requests)
                for kind, n in d.errors.items():
                    errors.add_metric([link.name, unit, kind], n)
                rtt.add_metric([link.name, unit, "0.5"], d.rtt_ms_p50 / 1e3)
                rtt.add_metric([link.name, unit, "0.99"], d.rtt_ms_p99 / 1e3)
        yield from (link_up, reconnects, units, requests, errors, rtt)

    def _history(self, h) -> Iterable:
        if h is None:
            return
        yield GaugeMetricFamily("tempering_historian_backlog_lines", "Lines in the spool not yet "
                                "delivered", value=h.backlog_lines)
        yield GaugeMetricFamily("tempering_spool_fill_ratio", "Spool fill, 0..1 of spool_max_mb",
                                value=h.spool_fill)
        yield CounterMetricFamily("tempering_historian_appended", "Lines appended to the spool",
                                  value=h.appended_total)
        yield CounterMetricFamily("tempering_historian_delivered", "Lines the sink took",
                                  value=h.delivered_total)
        yield CounterMetricFamily("tempering_historian_dropped", "Lines lost to the spool-full "
                                  "policy", value=h.dropped_total)
        yield CounterMetricFamily("tempering_historian_set_aside", "Lines the sink refused, set "
                                  "aside", value=h.set_aside_total)
        yield GaugeMetricFamily("tempering_historian_retrying", "1 while the sink fails and the "
                                "forwarder retries", value=1 if h.state == "retrying" else 0)


def health(s: Sources) -> tuple[bool, dict[str, Any]]:
    """(healthy, the JSON body): every problem found, in words, with what it is about."""
    problems: list[dict[str, str]] = []
    status = s.plc_status()
    snap = s.snapshot()
    if status:
        problems.append({"check": "plc", "problem": status})
    elif snap is None:
        problems.append({"check": "plc", "problem": "no snapshot from the PLC yet"})
    body: dict[str, Any] = {"machine": s.machine}
    if snap is not None:
        st = snap.stats or {}
        late_ms = st.get("late_ms_p99", 0.0)
        period_ms = s.period_s * 1e3
        body["plc"] = {"pid": s.plc_pid(), "tick": snap.tick, "phase": snap.phase,
                       "late_ms_p99": round(late_ms, 3), "overruns": int(st.get("overruns", 0)),
                       "trips": list(snap.trips)}
        if "plc.watchdog" in snap.trips:
            problems.append({"check": "watchdog", "problem": "scan watchdog trip latched (reset needed)"})
        if late_ms > period_ms:
            problems.append({"check": "scan", "problem": f"scan lateness p99 {late_ms:.1f} ms > "
                                                         f"period {period_ms:.0f} ms"})
    links = s.links()
    body["links"] = {link.name: link.state for link in links}
    for link in links:
        if link.state != "connected":
            problems.append({"check": f"link {link.name}", "problem": f"link {link.state}: {link.last_error}"})
            continue
        for d in link.devices:
            if not unit_up(d):
                what = (f"unit {d.state}" if d.state != "connected" else
                        f"unit not answering ({d.consecutive_failures} failed polls)")
                problems.append({"check": f"link {link.name} unit {d.unit}",
                                 "problem": f"{what}: {d.last_error}"})
    body["status"] = "fail" if problems else "ok"
    body["problems"] = problems
    return not problems, body


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:       # no line per scrape on the console
        pass


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``host:port``, served by threads of their own (a slow
    scraper holds one thread, never the window's loop)."""

    def __init__(self, sources: Sources, host: str, port: int, plc_process: bool = True):
        self.sources = sources
        self.registry = CollectorRegistry()
        self.registry.register(TemperingCollector(sources))
        ProcessCollector(registry=self.registry)                       # this window: process_*
        if plc_process:                                                # tempering_plc_process_*
            ProcessCollector(namespace="tempering_plc", pid=lambda: sources.plc_pid() or "-",
                             registry=self.registry)
        self.host, self.port = host, port
        self._metrics = make_wsgi_app(self.registry)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self._server.server_address[1] if self._server else self.port
        return f"http://{host}:{port}"

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            ok, body = health(self.sources)
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [json.dumps(body).encode() + b"\n"]
        if path in ("/metrics", "/metrics/"):
            return self._metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics or /healthz\n"]

    def start(self) -> str:
        """Listen (OSError if the address cannot be bound) and serve; returns the base URL."""
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]

        class Server(ThreadingWSGIServer):
            address_family = family
        self._server = make_server(self.host, self.port, self.app, Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
