"""Metrics and health over HTTP (``tempering.monitoring``).

- The collector and the health check on made-up sources: a real ``ScanStats`` summary, real
  alarms, link and historian diagnostics (no sockets, no sleeps).
- The HTTP server: a port already taken is an OSError for the caller, nothing else.
- A real ``tempering run`` scraped every second by a real Prometheus (Debian's ``prometheus``):
  the series it stored; ``/healthz`` 200 while the machine runs, 503 with the reason while the
  twin is stopped (SIGSTOP: its unit stops answering).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from historian.service import HistorianDiagnostics
from plc.alarms import Alarm, Priority
from plc.modbus.link import DeviceDiagnostics, LinkDiagnostics
from plc.runtime import ScanStats
from tempering.monitoring import MetricsServer, Sources, TemperingCollector, health


def _stats(lates_s, logics_s) -> dict[str, float]:
    st = ScanStats()
    for late, logic in zip(lates_s, logics_s):
        st.record(logic, late, overrun=False)
    return st.summary()


def _device(unit=1, state="connected", error="", failures=0) -> DeviceDiagnostics:
    return DeviceDiagnostics(unit, state, 120, {"timeout": 3, "exception": 1, "garbage": 0,
                                                "disconnect": 0}, error, 0.0, 2.0, 7.0, failures)


def _link(state="connected", devices=None, error="") -> LinkDiagnostics:
    return LinkDiagnostics("io", "tcp", "127.0.0.1:5020", state, 120, {}, error, 2.0, 7.0, 3, 40, 2,
                           0, tuple(devices or (_device(),)))


def _sources(**kw) -> Sources:
    snap = SimpleNamespace(
        tick=42, phase="pouring", trips=(), stats=_stats([0.0003, 0.0007, 0.0015, 0.03], [0.001] * 4),
        alarms=(Alarm("zone.pump.over_temp", active=True, acked=False, priority=Priority.HIGH),
                Alarm("zone.tank_bottom.deviation", active=True, priority=Priority.LOW),
                Alarm("grid.sag", active=False, priority=Priority.CRITICAL)))
    history = HistorianDiagnostics("local", "sending", 17, 0.25, False, 1000, 983, 0, 5, 0, 10.0, "", 0.0)
    base = dict(snapshot=lambda: snap, plc_pid=lambda: None, links=lambda: (_link(),),
                history=lambda: history, sessions=lambda: (2, 3))
    base.update(kw)
    return Sources("tempering-01", "Line 1", 0.1, **base)


def _scrape(sources: Sources) -> dict[tuple[str, tuple], float]:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    reg.register(TemperingCollector(sources))
    out = {}
    for family in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_collector_reads_the_snapshot_links_historian_and_server():
    src = _sources()
    src.judged(SimpleNamespace(verdict="PASS"))
    m = _scrape(src)
    assert m[("tempering_machine_info", (("machine_id", "tempering-01"), ("machine_name", "Line 1")))] == 1
    assert m[("tempering_plc_up", ())] == 1
    late = "tempering_scan_lateness_seconds_bucket"
    assert m[(late, (("le", "0.0005"),))] == 1                   # cumulative, le = "<="
    assert m[(late, (("le", "0.001"),))] == 2
    assert m[(late, (("le", "0.002"),))] == 3
    assert m[(late, (("le", "0.02"),))] == 3
    assert m[(late, (("le", "0.05"),))] == 4
    assert m[(late, (("le", "+Inf"),))] == 4
    assert m[("tempering_scan_lateness_seconds_count", ())] == 4
    assert m[("tempering_scan_lateness_seconds_sum", ())] == pytest.approx(0.0325)
    assert m[("tempering_scan_logic_seconds_bucket", (("le", "0.001"),))] == 4
    assert m[("tempering_scan_overruns_total", ())] == 0
    assert m[("tempering_alarms_active", (("priority", "high"),))] == 1
    assert m[("tempering_alarms_active", (("priority", "low"),))] == 1
    assert m[("tempering_alarms_active", (("priority", "critical"),))] == 0
    assert m[("tempering_alarms_unacknowledged", (("priority", "high"),))] == 1
    assert m[("tempering_modbus_link_up", (("link", "io"),))] == 1
    assert m[("tempering_modbus_unit_up", (("link", "io"), ("unit", "1")))] == 1
    assert m[("tempering_modbus_requests_total", (("link", "io"), ("unit", "1")))] == 120
    assert m[("tempering_modbus_errors_total", (("kind", "timeout"), ("link", "io"), ("unit", "1")))] == 3
    assert m[("tempering_modbus_round_trip_seconds",
              (("link", "io"), ("quantile", "0.99"), ("unit", "1")))] == pytest.approx(0.007)
    assert m[("tempering_historian_backlog_lines", ())] == 17
    assert m[("tempering_spool_fill_ratio", ())] == 0.25
    assert m[("tempering_historian_delivered_total", ())] == 983
    assert m[("tempering_historian_dropped_total", ())] == 5
    assert m[("tempering_opcua_sessions", ())] == 2
    assert m[("tempering_opcua_subscriptions", ())] == 3
    assert m[("tempering_batches_total", (("verdict", "PASS"),))] == 1
    assert m[("tempering_batches_total", (("verdict", "FAIL"),))] == 0


def test_no_plc_yet_gives_the_machine_without_scan_series():
    m = _scrape(_sources(snapshot=lambda: None, plc_status=lambda: "PLC not connected",
                         links=lambda: (), history=lambda: None, sessions=None))
    assert m[("tempering_plc_up", ())] == 0
    assert not any(name.startswith(("tempering_scan_", "tempering_alarms_", "tempering_opcua_"))
                   for name, _ in m)


@pytest.mark.parametrize("change, check, words", [
    (dict(plc_status=lambda: "no snapshot from the PLC for 2.5 s"), "plc", "no snapshot"),
    (dict(links=lambda: (_link("down", error="connection refused"),)), "link io", "link down: connection refused"),
    (dict(links=lambda: (_link(devices=[_device(state="demoted", error="unit 1 demoted after 3 "
                                                "failed polls")]),)), "link io unit 1", "unit demoted"),
    (dict(links=lambda: (_link(devices=[_device(), _device(2, failures=1, error="no reply")]),)),
     "link io unit 2", "unit not answering (1 failed polls): no reply"),
])
def test_health_names_each_problem(change, check, words):
    ok, body = health(_sources(**change))
    assert not ok and body["status"] == "fail"
    assert [p["check"] for p in body["problems"]] == [check]
    assert words in body["problems"][0]["problem"]


def test_health_is_ok_on_time_and_fails_on_a_watchdog_trip_or_late_scans():
    ok, body = health(_sources())
    assert ok and body["status"] == "ok" and body["problems"] == [] and body["links"] == {"io": "connected"}
    snap = _sources().snapshot()
    tripped = SimpleNamespace(**{**vars(snap), "trips": ("plc.watchdog",)})
    ok, body = health(_sources(snapshot=lambda: tripped))
    assert not ok and body["problems"][0]["check"] == "watchdog"
    late = SimpleNamespace(**{**vars(snap), "stats": _stats([0.15] * 10, [0.001] * 10)})
    ok, body = health(_sources(snapshot=lambda: late))
    assert not ok and "scan lateness p99 150.0 ms > period 100 ms" in body["problems"][0]["problem"]


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_server_answers_and_a_taken_port_is_an_oserror(free_port):
    server = MetricsServer(_sources(), "127.0.0.1", free_port())
    url = server.start()
    try:
        status, body = _get(url + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = _get(url + "/metrics")
        assert status == 200 and b"tempering_scan_lateness_seconds_bucket" in body
        assert b"\nprocess_cpu_seconds_total " in body          # the window's own process
        assert _get(url + "/nothing")[0] == 404
        with pytest.raises(OSError):
            MetricsServer(_sources(), "127.0.0.1", server.port).start()
    finally:
        server.stop()


# -- a real tempering run, scraped by a real Prometheus --------------------------------------------


def _prometheus(tmp_path, target: str):
    """Prometheus with the README's scrape config, its target replaced by ``target``."""
    from servers import PrometheusServer

    if shutil.which(PrometheusServer.binary) is None:
        pytest.skip("prometheus is not installed (make system-deps)")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = re.search(r"\*\*Scraping it\.\*\*.*?```yaml\n(.*?)```", readme, re.S).group(1)
    configs = yaml.safe_load(example)["scrape_configs"]
    configs[0]["static_configs"][0]["targets"] = [target]
    return PrometheusServer(tmp_path / "prometheus", [], scrape_configs=configs).start()


def test_a_real_run_scraped_by_prometheus_and_its_health(tmp_path):
    from runs import TemperingRun, machine_dir, stopped

    config = machine_dir(tmp_path)
    listen = yaml.safe_load(config.read_text())["monitoring"]["listen"]
    url = f"http://{listen}"
    with TemperingRun(config, "--no-start") as run:
        run.wait_for(rf"metrics: {url}/metrics \(health: {url}/healthz\)")
        twin = run.pid("twin")
        prom = _prometheus(tmp_path, listen)
        try:
            deadline = time.monotonic() + 30
            while _get(url + "/healthz")[0] != 200:          # the PLC's links come up
                assert time.monotonic() < deadline, _get(url + "/healthz")
                time.sleep(0.2)
            prom.wait_for("tempering_scan_lateness_seconds_count", lambda v: v > 10)
            assert prom.value(f'up{{instance="{listen}",job="tempering"}}') == 1
            assert prom.value('tempering_machine_info{machine="tempering-01",machine_id="tempering-01"}') == 1
            assert prom.value('tempering_modbus_link_up{link="io"}') == 1
            assert prom.value("tempering_plc_up") == 1
            assert prom.value("tempering_plc_process_resident_memory_bytes") > 10e6
            assert prom.value("process_resident_memory_bytes") > 10e6
            assert prom.value('tempering_scan_lateness_seconds_bucket{le="+Inf"}') > 10
            assert prom.value("tempering_historian_delivered_total") >= 0
            assert prom.value("tempering_opcua_sessions") == 0
            with stopped(twin):                             # the twin hangs: its unit goes quiet
                deadline = time.monotonic() + 20
                while (answer := _get(url + "/healthz"))[0] == 200:
                    assert time.monotonic() < deadline, "healthz stayed 200 with the twin stopped"
                    time.sleep(0.2)
                status, body = answer
                assert status == 503, answer
                report = json.loads(body)
                assert report["status"] == "fail"
                assert any(p["check"].startswith("link io") for p in report["problems"]), report
                prom.wait_for('tempering_modbus_unit_up{link="io",unit="1"}', lambda v: v == 0)
            deadline = time.monotonic() + 30
            while _get(url + "/healthz")[0] != 200:          # back once the twin answers again
                assert time.monotonic() < deadline, _get(url + "/healthz")
                time.sleep(0.2)
        finally:
            prom.stop()


def test_a_taken_monitoring_port_leaves_the_machine_running(tmp_path):
    from runs import TemperingRun, machine_dir

    config = machine_dir(tmp_path)
    host, _, port = yaml.safe_load(config.read_text())["monitoring"]["listen"].rpartition(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        with TemperingRun(config, "--no-start") as run:
            run.wait_for(rf"metrics: cannot listen on {host}:{port}: Address already in use; the "
                         r"machine runs without /metrics and /healthz")
            run.wait_for(r"^plc: pid")
            time.sleep(1.0)             # the window goes on: no restart by the supervisor
            assert run.proc.poll() is None
            assert len([l for l in run.lines if "supervisor: window started" in l]) == 1, run.output
