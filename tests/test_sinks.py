"""The historian's sinks against real servers on loopback: InfluxDB 1.x (``influxd``) through
Influx1Sink, VictoriaMetrics' InfluxDB v2 write API through Influx2Sink, the local store.

What a sink promises (historian/sinks.py): every line written with its tags, fields and ns
timestamp, or an exception that says whether a retry can help (SinkRejected: the data itself,
with the server's message; SinkUnavailable: everything else); the same lines twice store each
point once; gzip bodies; credentials nowhere but in headers.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT
from historian.sinks import (REJECTED_STATUSES, Influx1Sink, Influx2Sink, LocalSink, SinkError,
                             SinkRejected, SinkUnavailable, error_for_status, make_sink)

PASSWORD = "pw-Zq81-secret"
TOKEN = "tok-7Hc2-secret"
T0 = 1_795_000_000_123_456_789          # ns, not a multiple of 1000: precision must be ns


def zone_lines(n: int, t0_ns: int = T0, step_ns: int = 1_000_000, zone: str = "tank") -> list[str]:
    return [f'zone,machine=tm-1,zone={zone},batch=b7,recipe=dark-70 temp_c={45 + i / 100:.2f},'
            f'setpoint_c=45.0,seq={i}i,quality="good" {t0_ns + i * step_ns}' for i in range(n)]


def no_secret(*texts: object) -> None:
    for text in texts:
        assert PASSWORD not in str(text) and TOKEN not in str(text), text


# ------------------------------------------------------------------------- status mapping


@pytest.mark.parametrize("status, kind", [
    (400, SinkRejected), (413, SinkRejected), (422, SinkRejected),
    (401, SinkUnavailable), (403, SinkUnavailable), (404, SinkUnavailable),
    (408, SinkUnavailable), (429, SinkUnavailable), (500, SinkUnavailable),
    (502, SinkUnavailable), (503, SinkUnavailable), (504, SinkUnavailable)])
def test_status_mapping(status, kind):
    e = error_for_status("s", status, "why")
    assert type(e) is kind and e.status == status and e.sink == "s" and "why" in e.message
    assert REJECTED_STATUSES == {400, 413, 422}


# ---------------------------------------------------------------------------- InfluxDB 1.x


def test_influx1_points_are_queryable_with_tags_fields_and_ns_timestamps(influxdb1):
    sink = Influx1Sink(influxdb1.url, influxdb1.database)
    lines = zone_lines(3) + [
        'event,machine=tm-1,kind=phase,batch=b7,recipe=dark-70 message="heating \\"done\\"",'
        f'phase="cooling",ok=true {T0 + 7}']
    sink.write(lines)
    rows = influxdb1.rows("SELECT * FROM zone ORDER BY time")
    assert rows == [{"time": T0 + i * 1_000_000, "machine": "tm-1", "zone": "tank", "batch": "b7",
                     "recipe": "dark-70", "temp_c": 45 + i / 100, "setpoint_c": 45.0, "seq": i,
                     "quality": "good"} for i in range(3)]
    [event] = influxdb1.rows("SELECT * FROM event")
    assert event == {"time": T0 + 7, "machine": "tm-1", "kind": "phase", "batch": "b7",
                     "recipe": "dark-70", "message": 'heating "done"', "phase": "cooling",
                     "ok": True}
    sink.close()


@pytest.mark.parametrize("gzip", [True, False])
def test_influx1_gzip_on_and_off_both_land(influxdb1, gzip):
    sink = Influx1Sink(influxdb1.url, influxdb1.database, gzip=gzip)
    assert sink.gzip is gzip
    sink.write(zone_lines(5000))
    [row] = influxdb1.rows("SELECT count(seq) FROM zone")
    assert row["count"] == 5000


def vm_bytes_received(vm) -> float:
    text = urllib.request.urlopen(f"{vm.url}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vm_tcplistener_read_bytes_total"))


def bytes_on_the_wire(vm, sink, lines) -> float:
    """Bytes the server read from its socket for ``sink.write(lines)`` (VM publishes the count
    a moment after the connection closes)."""
    before = vm_bytes_received(vm)
    sink.write(lines)
    sink.close()
    deadline = time.monotonic() + 5
    while (after := vm_bytes_received(vm)) - before < 1000 and time.monotonic() < deadline:
        time.sleep(0.1)
    return after - before


def test_bodies_are_gzip_compressed_on_the_wire(victoria_metrics):
    """Both sinks, gzip on vs off, measured as bytes received by a real server's listener."""
    vm = victoria_metrics
    lines = zone_lines(2000, t0_ns=time.time_ns())
    plain = sum(len(x) + 1 for x in lines)
    for make in (lambda gz: Influx1Sink(vm.url, "tempering", gzip=gz),
                 lambda gz: Influx2Sink(vm.url, TOKEN, "plant", "tempering", gzip=gz)):
        raw = bytes_on_the_wire(vm, make(False), lines)
        packed = bytes_on_the_wire(vm, make(True), lines)
        assert raw >= plain and packed < plain / 5, (raw, packed, plain)


def test_influx1_malformed_line_is_rejected_with_the_servers_message(influxdb1):
    sink = Influx1Sink(influxdb1.url, influxdb1.database)
    with pytest.raises(SinkRejected) as info:
        sink.write(zone_lines(2) + ["zone,zone=tank temp_c=notanumber 1"])
    e = info.value
    assert e.status == 400 and e.sink == sink.name
    assert "unable to parse" in e.message and "zone,zone=tank temp_c=notanumber 1" in e.message
    # A field of another type than the one stored is the data's fault too.
    with pytest.raises(SinkRejected, match="field type conflict"):
        sink.write([f'zone,machine=tm-1,zone=tank temp_c="hot" {T0 + 5}'])


def test_influx1_wrong_database_is_unavailable(influxdb1):
    sink = Influx1Sink(influxdb1.url, "no_such_db")
    with pytest.raises(SinkUnavailable) as info:
        sink.write(zone_lines(1))
    assert info.value.status == 404 and 'database not found: "no_such_db"' in info.value.message
    with pytest.raises(SinkUnavailable, match="retention policy not found"):
        Influx1Sink(influxdb1.url, influxdb1.database, "no_such_rp").write(zone_lines(1))


def test_influx1_server_stopped_is_unavailable_then_the_same_sink_recovers(influxdb1):
    sink = Influx1Sink(influxdb1.url, influxdb1.database, timeout_s=2.0)
    sink.write(zone_lines(10))                        # the kept-alive connection is now open
    influxdb1.stop()
    with pytest.raises(SinkUnavailable) as info:
        sink.write(zone_lines(10, t0_ns=T0 + 10**9))
    assert info.value.status is None and "Connection refused" in info.value.message
    influxdb1.start()
    sink.write(zone_lines(10, t0_ns=T0 + 10**9))
    [row] = influxdb1.rows("SELECT count(seq) FROM zone")
    assert row["count"] == 20


def test_influx1_unreachable_host_and_timeout_are_unavailable(free_port):
    with pytest.raises(SinkUnavailable, match="cannot reach"):
        Influx1Sink(f"http://127.0.0.1:{free_port()}", "db", timeout_s=1).write(zone_lines(1))
    with pytest.raises(SinkUnavailable):
        Influx1Sink("http://no-such-host.invalid:8086", "db", timeout_s=1).write(zone_lines(1))


def test_influx1_the_same_lines_twice_store_each_point_once(influxdb1):
    sink = Influx1Sink(influxdb1.url, influxdb1.database)
    lines = zone_lines(500)
    sink.write(lines)
    sink.write(lines[100:300])          # a replay of part of it
    sink.write(lines)                   # and of all of it
    [row] = influxdb1.rows("SELECT count(seq), sum(seq) FROM zone")
    assert row["count"] == 500 and row["sum"] == sum(range(500))


def test_influx1_basic_auth(make_influxdb1):
    server = make_influxdb1(username="historian", password=PASSWORD)
    Influx1Sink(server.url, server.database, username="historian", password=PASSWORD
                ).write(zone_lines(3))
    assert server.rows("SELECT count(seq) FROM zone")[0]["count"] == 3
    # Credentials in the URL are taken as basic auth and dropped from the URL.
    url_sink = Influx1Sink(server.url.replace("//", f"//historian:{PASSWORD}@"), server.database)
    assert url_sink.url == server.url
    url_sink.write(zone_lines(3, t0_ns=T0 + 1))
    for user, password in (("historian", "wrong"), (None, None)):
        with pytest.raises(SinkUnavailable) as info:
            Influx1Sink(server.url, server.database, username=user, password=password
                        ).write(zone_lines(1))
        assert info.value.status == 401


def test_influx1_tls_verification(make_influxdb1):
    server = make_influxdb1(tls=True)
    assert server.url.startswith("https://")
    Influx1Sink(server.url, server.database, ca_file=str(server.ca_file)).write(zone_lines(2))
    Influx1Sink(server.url, server.database, verify_tls=False).write(zone_lines(2, t0_ns=T0 + 1))
    with pytest.raises(SinkUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        Influx1Sink(server.url, server.database).write(zone_lines(1))   # self-signed: refused
    assert server.rows("SELECT count(seq) FROM zone")[0]["count"] == 4


# ------------------------------------------------------------------- v2 API (VictoriaMetrics)


def test_influx2_points_land_in_victoria_metrics(victoria_metrics):
    vm = victoria_metrics
    sink = Influx2Sink(vm.url, TOKEN, "plant", "tempering")
    t0 = (time.time_ns() // 1_000_000) * 1_000_000          # VM keeps milliseconds
    sink.write(zone_lines(50, t0_ns=t0))
    [series] = vm.wait_export('zone_seq{zone="tank"}', 50)
    assert series["metric"] == {"__name__": "zone_seq", "machine": "tm-1", "zone": "tank",
                                "batch": "b7", "recipe": "dark-70"}
    assert series["values"] == list(range(50))
    assert series["timestamps"] == [(t0 + i * 1_000_000) // 1_000_000 for i in range(50)]
    [temps] = vm.export('zone_temp_c{zone="tank"}')
    assert temps["values"] == [45 + i / 100 for i in range(50)]
    sink.close()


def test_influx2_replay_stores_each_point_once(victoria_metrics):
    vm = victoria_metrics
    sink = Influx2Sink(vm.url, TOKEN, "plant", "tempering")
    lines = zone_lines(200, t0_ns=time.time_ns())
    sink.write(lines)
    sink.write(lines[50:150])
    [series] = vm.wait_export("zone_seq", 200)
    assert sorted(series["values"]) == list(range(200))


def test_influx2_rejected_and_unavailable(victoria_metrics):
    vm = victoria_metrics
    sink = Influx2Sink(vm.url, TOKEN, "plant", "tempering", timeout_s=2)
    too_long = f'zone,zone=tank message="{"x" * 300_000}" {time.time_ns()}'
    with pytest.raises(SinkRejected) as info:      # VM: lines over -influx.maxLineSize
        sink.write([too_long])
    assert info.value.status == 400 and "too long line" in info.value.message
    vm.stop()
    with pytest.raises(SinkUnavailable) as info:
        sink.write(zone_lines(1, t0_ns=time.time_ns()))
    assert info.value.status is None and "Connection refused" in info.value.message
    vm.start()
    sink.write(zone_lines(1, t0_ns=time.time_ns()))


def test_influx2_missing_endpoint_is_unavailable(influxdb1):
    """InfluxDB 1.6 has no /api/v2/write: 404, to be retried (the URL may be fixed)."""
    with pytest.raises(SinkUnavailable) as info:
        Influx2Sink(influxdb1.url, TOKEN, "plant", "tempering").write(zone_lines(1))
    assert info.value.status == 404


# ------------------------------------------------------------------------------- credentials


def test_credentials_never_in_names_or_messages(make_influxdb1, victoria_metrics, free_port):
    server = make_influxdb1(username="historian", password="right-one", tls=True)
    dead = f"http://127.0.0.1:{free_port()}"
    sinks = [
        Influx1Sink(server.url, server.database, username="historian", password=PASSWORD,
                    ca_file=str(server.ca_file)),                                    # 401
        Influx1Sink(server.url, server.database, username="historian", password=PASSWORD),  # TLS
        Influx1Sink(dead.replace("//", f"//historian:{PASSWORD}@"), "db", timeout_s=1),     # refused
        Influx2Sink(server.url, TOKEN, "plant", "tempering", ca_file=str(server.ca_file)),  # 404
        Influx2Sink(dead, TOKEN, "plant", "tempering", timeout_s=1),                        # refused
    ]
    for sink in sinks:
        no_secret(sink, repr(sink), sink.name, vars(sink).get("url"))
        with pytest.raises(SinkError) as info:
            sink.write(zone_lines(1))
        e = info.value
        no_secret(e, repr(e), e.message, e.sink, e.__cause__, e.__context__)
        sink.close()
    with pytest.raises(SinkRejected) as info:       # the server quoting the line back
        Influx1Sink(server.url, server.database, username="historian", password="right-one",
                    ca_file=str(server.ca_file)).write([f"zone,zone=a temp_c=x{PASSWORD} 1"])
    assert "right-one" not in str(info.value)
    no_secret(victoria_metrics.url)


# ------------------------------------------------------------------ local store and make_sink


def test_local_sink_writes_and_rejects(tmp_path):
    from historian.local import LocalStore
    store = LocalStore(tmp_path / "history.sqlite")
    sink = LocalSink(store)
    sink.write(zone_lines(3))
    sink.write(zone_lines(3))                        # replay: stored once
    with pytest.raises(SinkRejected) as info:
        sink.write(["not line protocol"])
    assert info.value.status is None and info.value.sink == sink.name
    sink.close()                                     # the store is not the sink's to close
    store.close()


def test_make_sink_builds_each_kind(influxdb1, make_influxdb1, victoria_metrics, tmp_path,
                                    monkeypatch):
    from historian.config import SinkSettings
    secured = make_influxdb1(username="historian", password=PASSWORD)
    monkeypatch.setenv("TEMPERING_INFLUX_PASSWORD", PASSWORD)
    monkeypatch.setenv("TEMPERING_INFLUX_TOKEN", TOKEN)
    one = make_sink(SinkSettings(kind="influxdb1", url=secured.url, database=secured.database,
                                 username="historian", password_env="TEMPERING_INFLUX_PASSWORD"))
    assert isinstance(one, Influx1Sink) and one.gzip
    one.write(zone_lines(2))
    assert secured.rows("SELECT count(seq) FROM zone")[0]["count"] == 2
    two = make_sink(SinkSettings(kind="influxdb2", url=victoria_metrics.url, org="plant",
                                 bucket="tempering", token_env="TEMPERING_INFLUX_TOKEN",
                                 timeout_s=5))
    assert isinstance(two, Influx2Sink) and two.timeout_s == 5
    two.write(zone_lines(2, t0_ns=time.time_ns()))
    local = make_sink(SinkSettings(kind="local", path=str(tmp_path / "h.sqlite")))
    assert isinstance(local, LocalSink)
    local.write(zone_lines(2))
    for sink in (one, two, local):
        no_secret(sink)
        sink.close()
    monkeypatch.delenv("TEMPERING_INFLUX_PASSWORD")
    with pytest.raises(ValueError, match="TEMPERING_INFLUX_PASSWORD is not set"):
        make_sink(SinkSettings(kind="influxdb1", url=influxdb1.url, database="d",
                               password_env="TEMPERING_INFLUX_PASSWORD"))


def test_sinks_import_no_config_or_client_at_import_time():
    code = ("import sys, historian.sinks; "
            "print(sorted(m for m in ('historian.config', 'influxdb_client', 'historian.local') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
