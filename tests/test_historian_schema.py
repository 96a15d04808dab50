"""The historian's pure parts: line protocol, sampling (interval, deadband, events, timestamps),
the embedded local store, and the whole path from a running PLC to the local store in virtual
time (no threads, no sleeps)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from historian.local import LineError, LocalStore, parse_line
from historian.schema import Sampler, field_value, line
from plc.channel import Snapshot
from plc.commands import Event, StartRecipe
from plc.image import Quality
from plc.scan import ZoneView

ZONES = ("tank_bottom", "tank_wall", "pump", "fountain")


def snap(time_s: float, temps=None, events=(), batch="m-000001", recipe="dark-70", phase="heating",
         quality=Quality.GOOD, sp=48.0) -> Snapshot:
    temps = temps or {z: 30.0 for z in ZONES}
    zones = tuple(ZoneView(z, None if quality is Quality.BAD else temps[z], sp, 55.5, quality, False)
                  for z in ZONES)
    return Snapshot(int(time_s * 10), time_s, phase, False, False, recipe, batch, 0.0, False, False,
                    zones, None, None, (), (), None, tuple(events), {})


@pytest.mark.parametrize("value, text", [
    (True, "true"), (False, "false"), (3, "3i"), (-7, "-7i"), (0.1, "0.1"), (31.5, "31.5"),
    ('say "hi"', r'"say \"hi\""'), ("back\\slash", r'"back\\slash"'), ("a\nb", '"a b"'),
])
def test_field_values(value, text):
    assert field_value(value) == text


def test_line_escapes_and_round_trips_through_the_parser():
    text = line("event", {"machine": "m 1", "kind": "a,b=c", "batch": ""},
                {"message": 'zone "pump", 1 = bad\\', "n": 2, "ok": True, "x": 1.5, "none": None},
                1_700_000_000_123_456_789)
    assert text == (r'event,batch=none,kind=a\,b\=c,machine=m\ 1 message="zone \"pump\", 1 = bad\\",'
                    r'n=2i,ok=true,x=1.5 1700000000123456789')
    m, tags, fields, ts = parse_line(text)
    assert (m, ts) == ("event", 1_700_000_000_123_456_789)
    assert tags == {"batch": "none", "kind": "a,b=c", "machine": "m 1"}
    assert fields == {"message": 'zone "pump", 1 = bad\\', "n": 2, "ok": True, "x": 1.5}


def test_a_batch_record_is_one_batch_line_at_its_end():
    from batch_samples import T0, record
    from historian.schema import batch_line

    rec = record(7, verdict="FAIL", reasons=("pouring within ±0.5 K of 31.5 °C for 80 % of the time",),
                 pouring_share=0.8)
    m, tags, fields, ts = parse_line(batch_line(rec))
    assert (m, ts) == ("batch", int((T0 + 5400) * 1e9))
    assert tags == {"machine": "tm-1", "batch": "tm-1-000007", "recipe": "dark", "verdict": "FAIL",
                    "outcome": "completed"}
    assert fields == {"duration_s": 5400.0, "energy_kwh": 12.5, "energy_kwh_per_kg": 12.5 / 40,
                      "alarms": 1, "interruptions": 1, "heating_s": 1800.0, "cooling_s": 1200.0,
                      "pouring_s": 2400.0, "pouring_in_band_share": 0.8}
    assert batch_line(rec) == batch_line(record(7, verdict="FAIL", reasons=rec.reasons,
                                                pouring_share=0.8))       # the same point again


def test_a_batch_line_leaves_out_what_the_record_does_not_know():
    from batch_samples import record
    from historian.schema import batch_line

    rec = record(8, kg=None, pouring_share=None, verdict="INCOMPLETE", outcome="aborted")
    rec = replace(rec, phases=rec.phases[:1], alarms=(), interruptions=(), batch_id="tm 1,x=000008")
    m, tags, fields, _ = parse_line(batch_line(rec))
    assert tags["batch"] == "tm 1,x=000008" and tags["outcome"] == "aborted"
    assert fields == {"duration_s": 5400.0, "energy_kwh": 12.5, "alarms": 0, "interruptions": 0,
                      "heating_s": 1800.0}


def test_a_line_without_fields_is_refused():
    with pytest.raises(ValueError):
        line("zone", {"zone": "pump"}, {"temp_c": None}, 1)


@pytest.mark.parametrize("bad", ["zone temp_c=1", "zone,zone=pump temp_c= 1", "zone temp_c=1 abc"])
def test_parser_refuses_bad_lines(bad):
    with pytest.raises(LineError):
        parse_line(bad)


def test_zone_samples_every_interval_of_scan_time_with_the_scan_timestamp():
    s = Sampler("m", interval_s=1.0)
    out = []
    for i in range(30):                        # 3 s of 100 ms scans, starting at t = 1000.05
        out += s.lines(snap(1000.05 + i * 0.1))
    zone = [parse_line(x) for x in out if x.startswith("zone,")]
    assert len(zone) == 3 * 4
    assert sorted({ts for *_, ts in zone}) == [1000_050_000_000, 1001_050_000_000, 1002_050_000_000]
    m, tags, fields, ts = zone[0]
    assert tags == {"machine": "m", "zone": "tank_bottom", "phase": "heating", "batch": "m-000001",
                    "recipe": "dark-70"}
    assert fields == {"temp_c": 30.0, "setpoint_c": 48.0, "output_pct": 55.5, "quality": "good"}


def test_deadband_writes_on_change_quality_change_and_after_max_silence():
    s = Sampler("m", interval_s=1.0, deadband_c=0.2, max_silence_s=10.0)
    written = []
    for i in range(30):
        temp = 30.0 + (0.5 if 5 <= i < 20 else 0.0) + (0.1 if i % 2 else 0.0)   # 0.1 K noise
        q = Quality.BAD if i == 25 else Quality.GOOD
        lines = [x for x in s.lines(snap(float(i), {z: temp for z in ZONES}, quality=q))
                 if ",zone=pump" in x and x.startswith("zone,")]
        if lines:
            written.append(i)
    # first sample; the 0.5 K step at 5 and back at 20; silence rewrites at 15 (10 s after 5);
    # the bad reading at 25 and good again at 26
    assert written == [0, 5, 15, 20, 25, 26]


def test_bad_sensor_sample_has_no_temperature():
    s = Sampler("m")
    zone = [parse_line(x) for x in s.lines(snap(5.0, quality=Quality.BAD)) if x.startswith("zone,")]
    assert all("temp_c" not in f and f["quality"] == "bad" for _, _, f, _ in zone)


def test_events_and_alarm_transitions_always_written_with_unique_timestamps():
    s = Sampler("m", interval_s=60.0)
    s.lines(snap(0.0))
    evs = (Event("command_accepted", 10.0, "StartRecipe by op"),
           Event("command_accepted", 10.0, "Hold by op"),
           Event("alarm", 10.0, "zone.pump.sensor: normal -> unack_active: open sensor",
                 (("alarm_id", "zone.pump.sensor"), ("from", "normal"), ("to", "unack_active"),
                  ("priority", 900), ("user", ""))))
    out = [parse_line(x) for x in s.lines(snap(10.0, events=evs))]
    events = [x for x in out if x[0] == "event"]
    assert [e[1]["kind"] for e in events] == ["command_accepted", "command_accepted", "alarm"]
    assert events[0][3] == 10_000_000_000 and events[1][3] == 10_000_000_001   # same series
    assert events[2][3] == 10_000_000_000
    (alarm,) = [x for x in out if x[0] == "alarm"]
    assert alarm[1] == {"machine": "m", "alarm": "zone.pump.sensor", "priority": "900",
                        "batch": "m-000001", "recipe": "dark-70"}
    assert alarm[2]["state"] == "unack_active" and alarm[2]["from"] == "normal"
    assert not [x for x in out if x[0] == "zone"]     # the interval is not over


def test_sampling_is_deterministic():
    snaps = [snap(i * 0.1, {z: 30 + i / 100 for z in ZONES}) for i in range(50)]
    a, b = Sampler("m", 0.5, 0.01), Sampler("m", 0.5, 0.01)
    assert [a.lines(x) for x in snaps] == [b.lines(x) for x in snaps]


def test_local_store_is_idempotent_filters_by_tags_and_prunes(tmp_path):
    now = [2_000_000.0]
    store = LocalStore(tmp_path / "h.sqlite", retention_days=1, wall=lambda: now[0])
    s = Sampler("m")
    lines = []
    for i in range(5):
        lines += s.lines(snap(now[0] - 10 + i, {z: 30.0 + i for z in ZONES}))
    store.write_lines(lines)
    store.write_lines(lines)                               # a replay stores nothing new
    assert store.count("zone") == 5 * 4 * 4                # 4 fields of 4 zones, 5 samples
    pump = store.read_raw("zone", "temp_c", {"zone": "pump"}, 0, 2**62)
    assert [v for _, v in pump] == [30.0, 31.0, 32.0, 33.0, 34.0]
    assert store.read_raw("zone", "temp_c", {"zone": "pump", "batch": "other"}, 0, 2**62) == []
    with pytest.raises(LineError):                          # all or nothing
        store.write_lines([line("zone", {"zone": "x"}, {"temp_c": 1.0}, 1), "garbage"])
    assert store.read_raw("zone", "temp_c", {"zone": "x"}, 0, 2**62) == []
    now[0] += 2 * 86400                                     # past the retention
    store.write_lines([line("zone", {"zone": "y"}, {"temp_c": 1.0}, int(now[0] * 1e9))])
    assert store.count("zone") == 1
    store.close()


def test_plc_to_local_store_in_virtual_time(tmp_path, program):
    """A running PLC's snapshots through the real spool and forwarder into the local store."""
    from historian.config import HistorianSettings, SinkSettings
    from historian.service import Historian
    from plc.channel import SnapshotChannel
    from plc.runtime import Controller, run_virtual
    from twin import Twin
    from twin.inprocess import InProcessTwinIo
    from opcua_server.config import load

    cfg, _ = load()
    settings = HistorianSettings(spool_dir="spool", sink=SinkSettings(path="h.sqlite"))
    channel = SnapshotChannel()
    h = Historian(settings, "m", channel, base_dir=tmp_path)
    c = Controller(program, channel=channel)
    io = InProcessTwinIo(Twin(cfg.twin, seed=3, initial_temp_c=40.0))
    c.submit(StartRecipe("dark-70", user="t"))
    t = 1_800_000_000.0
    for _ in range(6):                                      # 60 s in 10 s steps
        t = run_virtual(c, io, io.advance, 100, start_s=t)
        h.drain()
    while h.forwarder.step():
        pass
    d = h.diagnostics()
    assert d.backlog_lines == 0 and d.snapshots_dropped == 0 and d.delivered_total == d.appended_total
    pump = h.store.read_raw("zone", "temp_c", {"zone": "pump", "recipe": "dark-70"}, 0, 2**62)
    assert len(pump) == 60
    assert h.store.count("event") >= 3                       # command, phase, batch start
    h.stop(0.0)


def test_readme_influxql_queries_answer_the_quality_questions(influxdb1):
    """The README's InfluxQL queries, run on a real InfluxDB 1.x holding a batch the sampler
    wrote through the InfluxDB 1.x sink."""
    import re
    from pathlib import Path

    from historian.sinks import Influx1Sink

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```sql\n(.*?)```", readme, re.S).group(1)
    queries = [q for q in block.splitlines() if q.startswith("SELECT")]
    assert len(queries) == 4
    batch = "tempering-01-000042"
    s = Sampler("tempering-01")
    lines = []
    import time
    t0 = float(int(time.time()) - 86400)            # yesterday (a GROUP BY time ends at now())
    for i in range(120):                              # 1 min heating, 1 min pouring
        phase = "heating" if i < 60 else "pouring"
        fountain = 40.0 if i < 60 else (34.8 if 100 <= i < 107 else 31.5)   # 7 s above 34.5
        temps = {z: 31.5 for z in ZONES} | {"fountain": fountain}
        events = (Event("phase", t0 + i, "heating -> pouring: goal reached"),) if i == 60 else ()
        lines += s.lines(snap(t0 + i, temps, events=events, batch=batch, phase=phase))
    lines += Sampler("tempering-01").lines(snap(t0, {z: 99.0 for z in ZONES}, batch="other",
                                                phase="pouring"))
    sink = Influx1Sink(influxdb1.url, influxdb1.database)
    sink.write(lines)
    sink.close()
    means, maxima, above, events = (influxdb1.rows(q) for q in queries)
    assert {r["zone"] for r in means} == set(ZONES) and len(means) >= 8
    assert {r["zone"]: r["max"] for r in maxima} == {"tank_bottom": 31.5, "tank_wall": 31.5,
                                                       "pump": 31.5, "fountain": 34.8}
    assert [r["count"] for r in above] == [7]
    assert [r["message"] for r in events] == ["heating -> pouring: goal reached"]


def test_spool_alarm_at_80_percent_logged_once_and_in_the_diagnostics(tmp_path, caplog):
    import logging

    from historian.config import HistorianSettings, SinkSettings
    from historian.service import Historian
    from plc.channel import SnapshotChannel

    settings = HistorianSettings(spool_dir="spool", spool_max_mb=0.02,   # 20 KiB, nothing sent
                                 sink=SinkSettings(kind="influxdb1", url="http://127.0.0.1:9",
                                                   database="x"))
    channel = SnapshotChannel()
    h = Historian(settings, "m", channel, base_dir=tmp_path)
    fills = []
    with caplog.at_level(logging.WARNING, logger="historian.service"):
        for i in range(80):
            channel.publish(snap(1000.0 + i))
            h.drain()
            fills.append(h.diagnostics().spool_fill)
    d = h.diagnostics()
    assert d.spool_alarm and d.spool_fill >= 0.8 and d.backlog_lines > 0
    assert fills[0] < 0.8                       # it was not on from the start
    warnings = [r for r in caplog.records if r.name == "historian.service"]
    assert len(warnings) == 1 and "http://127.0.0.1:9" in warnings[0].getMessage()
    assert d.dropped_total > 0                  # drop_oldest made room once it was full
    h.stop(0.0)


def test_readme_batch_queries_answer_the_quality_questions(influxdb1):
    """The README's InfluxQL queries on the ``batch`` measurement, run on a real InfluxDB 1.x
    holding the batch lines of four records (three of dark-70, one of milk-35)."""
    import re
    import time
    from pathlib import Path

    from batch_samples import record
    from historian.schema import batch_line
    from historian.sinks import Influx1Sink

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```sql\n(.*?)```", readme, re.S) if 'FROM "batch"' in b)
    queries = [q for q in block.splitlines() if q.startswith("SELECT")]
    assert len(queries) == 4
    day = 86400.0
    t0 = float(int(time.time() // day) * day) - 3 * day       # midnight, three days ago
    recs = [record(40, machine="tempering-01", recipe="dark-70", start_s=t0, pouring_share=0.95),
            record(41, machine="tempering-01", recipe="dark-70", start_s=t0 + 7200, verdict="FAIL",
                   reasons=("pouring within ±0.5 K for 80 % of the time",), pouring_share=0.8),
            record(42, machine="tempering-01", recipe="dark-70", start_s=t0 + day, verdict="FAIL",
                   kg=None, pouring_share=0.7),
            record(43, machine="tempering-01", recipe="milk-35", start_s=t0 + 2 * day, kg=50.0,
                   pouring_share=0.99)]
    sink = Influx1Sink(influxdb1.url, influxdb1.database)
    sink.write([batch_line(r) for r in recs])
    sink.close()
    listed, failed, passed, one = (influxdb1.rows(q) for q in queries)
    assert sorted((r["recipe"], r["verdict"], r["pouring_in_band_share"]) for r in listed) == [
        ("dark-70", "FAIL", 0.7), ("dark-70", "FAIL", 0.8), ("dark-70", "PASS", 0.95),
        ("milk-35", "PASS", 0.99)]
    assert [(r["recipe"], r["count"]) for r in failed] == [("dark-70", 1), ("dark-70", 1)]   # 2 days
    assert {r["recipe"]: (r["mean"], r["mean_1"]) for r in passed} == {
        "dark-70": (12.5 / 40, 0.95), "milk-35": (12.5 / 50, 0.99)}
    assert len(one) == 1 and one[0]["verdict"] == "FAIL" and one[0]["energy_kwh_per_kg"] is None
    assert (one[0]["alarms"], one[0]["interruptions"], one[0]["duration_s"]) == (1, 1, 5400)


def test_lines_made_elsewhere_go_through_the_spool_to_the_store(tmp_path):
    """The window's batch records reach the historian as lines (Historian.add_lines): stored
    with the samples, by the sampler's own thread."""
    from historian.config import HistorianSettings, SinkSettings
    from historian.service import Historian
    from plc.channel import SnapshotChannel

    h = Historian(HistorianSettings(spool_dir="spool", sink=SinkSettings(path="h.sqlite")), "m",
                  SnapshotChannel(), base_dir=tmp_path)
    h.add_lines([line("batch", {"machine": "m", "batch": "m-000001", "recipe": "dark-70", "verdict": "PASS"},
                      {"duration_s": 3060.0}, 1_800_000_000_000_000_000)])
    assert h.drain() == 1
    while h.forwarder.step():
        pass
    assert h.store.count("batch") == 1
    h.stop(0.0)
