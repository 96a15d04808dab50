"""The alarm journal in the records: every alarm event stored once, queried by time, alarm and
batch; the same contract on SQLite and on a real PostgreSQL; a schema 2 database upgraded."""

from __future__ import annotations

import enum
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

import opcua_server.records as records_module
from opcua_server.records import JournalRow, Records, journal_values
from plc.commands import Event
from tempering.cli import main

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
T0 = datetime(2026, 3, 1, 9, 30, tzinfo=timezone.utc).timestamp()


class State(enum.Enum):          # the AlarmState values of the interface
    NORMAL = "normal"
    UNACK_ACTIVE = "unacknowledged_active"
    ACK_ACTIVE = "acknowledged_active"
    UNACK_RTN = "unacknowledged_returned_to_normal"


class Shelving(enum.Enum):
    UNSHELVED = "unshelved"


@dataclass(frozen=True)
class AlarmRecord:                # the fields of plc.alarms.Alarm that the journal reads
    id: str
    active: bool = False
    acked: bool = True
    confirmed: bool = True
    enabled: bool = True
    shelving: Shelving = Shelving.UNSHELVED
    message: str = ""
    priority: int = 700
    value: float | None = None
    changed: float = 0.0
    seq: int = 0

    @property
    def event_id(self) -> bytes:
        return f"{self.id}#{self.seq}#{round(self.changed * 1e6)}".encode()


def alarm_event(alarm_id: str, transition: str, to: State, t: float, seq: int, *, user: str = "",
                comment: str = "", batch_id: str | None = "B-1", active: bool = True,
                acked: bool = False, value: float | None = 36.5) -> Event:
    alarm = AlarmRecord(alarm_id, active=active, acked=acked, confirmed=not acked or True,
                        message=f"{alarm_id} above its limit", value=value, changed=t, seq=seq)
    return Event("alarm", t, f"{alarm_id}: -> {to.value}", (
        ("alarm_id", alarm_id), ("transition", transition), ("from", "normal"), ("to", to),
        ("priority", 700), ("user", user), ("comment", comment), ("value", value),
        ("batch_id", batch_id), ("recipe_id", "dark" if batch_id else None), ("alarm", alarm)))


def restart_event(t: float) -> Event:
    return Event("alarm_system", t, "PLC started: 12 alarms restored, 1 unacknowledged",
                 (("transition", "restart"), ("restored", 12), ("unacknowledged", 1)))


@pytest.fixture
def sqlite_records(tmp_path):
    r = Records(f"sqlite:///{tmp_path / 'tempering.db'}")
    try:
        yield r
    finally:
        r.close()


def a_flood(n: int, t0: float = T0) -> list[Event]:
    return [alarm_event(f"zone.z{i % 4}.over_temp", "active", State.UNACK_ACTIVE, t0 + i * 0.01, i)
            for i in range(n)]


# --------------------------------------------------------------------------- the contract


def test_every_field_is_stored_and_read_back(records):
    active = alarm_event("zone.tank.over_temp", "active", State.UNACK_ACTIVE, T0 + 0.25, 1)
    ack = alarm_event("zone.tank.over_temp", "acknowledged", State.ACK_ACTIVE, T0 + 60, 2,
                      user="olga", comment="heater checked", acked=True)
    started = restart_event(T0)
    noise = Event("phase", T0, "heating", (("phase", "heating"),))
    assert records.journal_alarms([active, noise, ack, started], machine="tm-1") == 3
    rows = records.alarm_journal()
    assert [r.kind for r in rows] == ["restart", "active", "acknowledged"]
    restart, first, second = rows
    assert all(isinstance(r, JournalRow) for r in rows)
    assert first.time == datetime(2026, 3, 1, 9, 30, 0, 250000, tzinfo=timezone.utc)
    assert first.time_s == pytest.approx(T0 + 0.25)
    assert (first.machine, first.alarm_id, first.state, first.severity) == (
        "tm-1", "zone.tank.over_temp", "unacknowledged_active", 700)
    assert (first.active, first.acked, first.enabled, first.shelving) == (True, False, True, "unshelved")
    assert (first.value, first.batch_id, first.recipe_id) == (36.5, "B-1", "dark")
    assert first.message == "zone.tank.over_temp above its limit"
    assert bytes.fromhex(first.event_id) == b"zone.tank.over_temp#1#%d" % round((T0 + 0.25) * 1e6)
    assert (second.user, second.comment, second.state, second.acked) == (
        "olga", "heater checked", "acknowledged_active", True)
    assert (restart.alarm_id, restart.state, restart.event_id, restart.active, restart.shelving) == (
        "", "", "", None, None)
    assert restart.message == "PLC started: 12 alarms restored, 1 unacknowledged"
    assert restart.as_dict()["time"] == "2026-03-01T09:30:00.000000Z"
    assert set(restart.as_dict()) == set(JournalRow.__dataclass_fields__)


def test_an_event_handed_in_again_is_stored_once(records):
    """A new plant window gets the events its predecessor did not acknowledge once more."""
    events = a_flood(5) + [restart_event(T0 - 1)]
    assert records.journal_alarms(events, machine="tm-1") == 6
    assert records.journal_alarms(events[2:] + a_flood(7)[5:], machine="tm-1") == 2   # 2 new ones
    assert records.journal_alarms(events + events, machine="tm-1") == 0
    rows = records.alarm_journal()
    assert len(rows) == 8 and len({r.event_id for r in rows}) == 8
    assert records.journal_alarms(events[:1], machine="tm-2") == 1     # another machine's


def test_query_by_time_alarm_batch_and_limit(records):
    events = [alarm_event("a", "active", State.UNACK_ACTIVE, T0, 1, batch_id="B-1"),
              alarm_event("b", "active", State.UNACK_ACTIVE, T0 + 10, 1, batch_id="B-1"),
              alarm_event("a", "cleared", State.UNACK_RTN, T0 + 20, 2, batch_id="B-2", active=False),
              alarm_event("b", "cleared", State.UNACK_RTN, T0 + 30, 2, batch_id=None, active=False)]
    records.journal_alarms(events[::-1], machine="tm-1")      # stored in any order, read by time
    times = lambda rows: [r.time_s - T0 for r in rows]
    assert times(records.alarm_journal()) == [0, 10, 20, 30]
    assert times(records.alarm_journal(since=T0 + 10)) == [10, 20, 30]             # inclusive
    assert times(records.alarm_journal(until=T0 + 20)) == [0, 10]                   # exclusive
    since = datetime.fromtimestamp(T0 + 5, timezone.utc)
    assert times(records.alarm_journal(since=since, until=since + timedelta(seconds=20))) == [10, 20]
    assert times(records.alarm_journal(since=since.replace(tzinfo=None))) == [10, 20, 30]  # naive: UTC
    assert times(records.alarm_journal(alarm_id="a")) == [0, 20]
    assert times(records.alarm_journal(batch_id="B-1")) == [0, 10]
    assert times(records.alarm_journal(alarm_id="b", batch_id="B-1")) == [10]
    assert times(records.alarm_journal(limit=3)) == [0, 10, 20]
    assert times(records.alarm_journal(limit=3, newest=True)) == [10, 20, 30]
    assert records.alarm_journal(limit=0) == [] and records.alarm_journal(alarm_id="zzz") == []
    with pytest.raises(ValueError, match="limit"):
        records.alarm_journal(limit=-1)
    with pytest.raises(TypeError, match="datetime"):
        records.alarm_journal(since="yesterday")


def test_rows_of_the_same_time_keep_the_order_they_came_in(records):
    same = [alarm_event(f"z{i}", "active", State.UNACK_ACTIVE, T0, 1) for i in (3, 1, 2)]
    records.journal_alarms(same, machine="tm-1")
    assert [r.alarm_id for r in records.alarm_journal()] == ["z3", "z1", "z2"]


def test_a_flood_of_events_is_written_fast(records):
    """Hundreds of transitions a second arrive in batches: one transaction each."""
    flood = a_flood(2000)
    started = time.perf_counter()
    for i in range(0, len(flood), 500):
        assert records.journal_alarms(flood[i:i + 500], machine="tm-1") == 500
    took = time.perf_counter() - started
    assert len(records.alarm_journal()) == 2000
    assert took < 5.0, f"2000 rows took {took:.2f} s"


# --------------------------------------------------------------------------- conversion, schema


def test_an_event_without_the_alarm_record_still_makes_a_row():
    e = Event("alarm", T0, "plc.lost: normal -> unacknowledged_active: PLC lost",
              (("alarm_id", "plc.lost"), ("from", "normal"), ("to", "unacknowledged_active"),
               ("priority", 900), ("user", "")))
    values = journal_values(e, "tm-1")
    assert values["alarm_id"] == "plc.lost" and values["severity"] == 900
    assert values["active"] is None and values["event_id"] == ""
    assert values["message"] == e.message
    assert journal_values(Event("phase", T0, "heating"), "tm-1") is None


def test_the_real_alarm_record_is_journaled():
    alarms = pytest.importorskip("plc.alarms")
    if not hasattr(alarms, "Shelving"):
        pytest.skip("plc.alarms has no ISA-18.2 lifecycle yet")
    a = alarms.Alarm("zone.tank.over_temp", active=True, acked=False, changed=T0, seq=3,
                     priority=alarms.Priority.HIGH, message="tank too hot")
    e = Event("alarm", T0, "x", (("alarm_id", a.id), ("transition", "active"),
                                 ("to", a.state.value), ("priority", int(a.priority)), ("alarm", a)))
    values = journal_values(e, "tm-1")
    assert values["event_id"] == a.event_id.hex() and values["state"] == a.state.value
    assert (values["active"], values["acked"], values["shelving"]) == (True, False, "unshelved")


def test_a_schema_2_database_gets_the_journal(tmp_path):
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as db:
        db.execute(text("CREATE TABLE audit (id INTEGER PRIMARY KEY, time TEXT NOT NULL, user_name TEXT "
                        "NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, old_value TEXT, new_value "
                        "TEXT, result TEXT NOT NULL, command_id TEXT, origin TEXT, peer TEXT, "
                        "certificate TEXT)"))
        db.execute(text("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)"))
        db.execute(text("INSERT INTO meta VALUES ('schema', '2')"))
        db.execute(text("INSERT INTO audit (time, user_name, action, target, result) VALUES "
                        "('2026-01-01T00:00:00.000Z', 'olga', 'call', 'Hold', 'Good')"))
    engine.dispose()
    r = Records(f"sqlite:///{path}")
    try:
        assert r.journal_alarms(a_flood(3), machine="tm-1") == 3
        assert len(r.alarm_journal()) == 3
        assert r.audit_entries()[0]["target"] == "Hold"
        with r.engine.connect() as db:
            assert db.execute(text("SELECT value FROM meta WHERE key = 'schema'")).scalar_one() == records_module.SCHEMA_VERSION
    finally:
        r.close()
    again = Records(f"sqlite:///{path}")          # and opens again as it is
    try:
        assert len(again.alarm_journal()) == 3
    finally:
        again.close()


# --------------------------------------------------------------------------- the plant window


@dataclass(frozen=True)
class Snap:                      # what the journal reads of a plc.channel.Snapshot
    events: tuple


async def test_the_window_journals_every_alarm_event_of_every_snapshot_once(sqlite_records):
    import asyncio

    from plc.channel import SnapshotChannel
    from tempering.window_process import journal_task

    channel, stop = SnapshotChannel(), asyncio.Event()
    sub = channel.subscribe(maxlen=4096)
    task = asyncio.create_task(journal_task(channel, sub, sqlite_records, "tm-1", stop))
    flood = a_flood(300)
    for i in range(0, 300, 30):          # ten snapshots of thirty transitions, with other events
        channel.publish(Snap((Event("phase", T0, "heating"), *flood[i:i + 30])))
    await asyncio.sleep(0)
    # a new window: the events not acknowledged by the one before come again with the next one
    channel.publish(Snap((*flood[250:], restart_event(T0 + 10))))
    stop.set()                           # the last snapshot still goes in on the way out
    await asyncio.wait_for(task, 10)
    rows = sqlite_records.alarm_journal()
    assert len(rows) == 301 and rows[-1].kind == "restart"
    assert [r.event_id for r in rows[:-1]] == [e.get("alarm").event_id.hex() for e in flood]
    assert sub not in channel._subs


async def test_the_window_keeps_the_events_while_the_database_fails(sqlite_records, caplog):
    import asyncio

    from plc.channel import SnapshotChannel
    from tempering import window_process

    class Failing:
        calls = 0

        def journal_alarms(self, events, machine):
            self.calls += 1
            if self.calls <= 3:
                raise OSError("database unreachable")
            return sqlite_records.journal_alarms(events, machine)

    channel, stop = SnapshotChannel(), asyncio.Event()
    sub = channel.subscribe()
    records = Failing()
    task = asyncio.create_task(window_process.journal_task(channel, sub, records, "tm-1", stop))
    channel.publish(Snap(tuple(a_flood(10))))
    while records.calls < 4:
        await asyncio.sleep(0.05)
    channel.publish(Snap(tuple(a_flood(12)[10:])))
    stop.set()
    await asyncio.wait_for(task, 10)
    assert len(sqlite_records.alarm_journal()) == 12
    assert sum("cannot write" in r.message for r in caplog.records) == 1     # once per outage


# --------------------------------------------------------------------------- tempering alarms journal


def journal_cli(tmp_path, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tempering"), "alarms", "journal", "--data-dir",
                           str(tmp_path / "opcua"), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def journal_dir(tmp_path):
    """A records database in ``tmp_path/opcua`` with a batch's alarm history, the last hour, of
    the default machine (tempering-01), and one row of another machine sharing the database."""
    now = time.time()
    r = Records(f"sqlite:///{tmp_path / 'opcua' / 'tempering.db'}")
    r.journal_alarms([
        restart_event(now - 3600),
        alarm_event("zone.tank.over_temp", "active", State.UNACK_ACTIVE, now - 1800, 1),
        alarm_event("zone.tank.over_temp", "acknowledged", State.ACK_ACTIVE, now - 1700, 2,
                    user="olga", comment="heater checked", acked=True),
        alarm_event("zone.pump.under_temp", "active", State.UNACK_ACTIVE, now - 300, 1, batch_id="B-2"),
    ], machine="tempering-01")
    r.journal_alarms([alarm_event("zone.pump.under_temp", "active", State.UNACK_ACTIVE, now - 200, 1)],
                     machine="tm-2")
    r.close()
    return tmp_path


def test_alarms_journal_prints_a_table_and_json(journal_dir):
    p = journal_cli(journal_dir)
    assert p.returncode == 0, p.stderr
    header, *lines = p.stdout.splitlines()
    assert header.split() == ["time", "alarm", "kind", "state", "user", "comment", "message"]
    assert [ln.split()[2:4] for ln in lines] == [["-", "restart"], ["zone.tank.over_temp", "active"],
                                                 ["zone.tank.over_temp", "acknowledged"],
                                                 ["zone.pump.under_temp", "active"]]
    assert "olga  heater checked  zone.tank.over_temp above its limit" in lines[2]
    assert lines[0].split()[1].endswith("Z")
    p = journal_cli(journal_dir, "--since", "45m", "--batch", "B-1", "--json")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert [(r["alarm_id"], r["kind"], r["user"]) for r in rows] == [
        ("zone.tank.over_temp", "active", ""), ("zone.tank.over_temp", "acknowledged", "olga")]
    assert set(rows[0]) == set(JournalRow.__dataclass_fields__) and rows[1]["acked"] is True


@pytest.mark.parametrize("argv, rows", [
    ((), 4),
    (("--limit", "2"), 2),                                   # the newest two
    (("--alarm", "zone.tank.over_temp"), 2),
    (("--since", "10m"), 1),
    (("--until", "10m"), 3),
    (("--since", "1d", "--until", "2h"), 0),
    (("--since", "2000-01-01T00:00:00+01:00", "--until", "2100-01-01"), 4),
    (("--since", "0.75h"), 3),
    (("--all-machines",), 5),                                # tm-2's row too
])
def test_alarms_journal_selects(journal_dir, capsys, argv, rows):
    assert main(["alarms", "journal", "--json", "--data-dir", str(journal_dir / "opcua"), *argv]) == 0
    got = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(got) == rows
    if argv[:1] == ("--limit",):
        assert [r["alarm_id"] for r in got] == ["zone.tank.over_temp", "zone.pump.under_temp"]


def test_alarms_journal_says_when_nothing_matches(journal_dir, capsys):
    assert main(["alarms", "journal", "--alarm", "nope", "--data-dir", str(journal_dir / "opcua")]) == 0
    assert capsys.readouterr().out.strip() == "no alarm journal entries match"


@pytest.mark.parametrize("argv, message", [
    (("--since", "yesterday"), "argument --since: expected an ISO 8601 time"),
    (("--until", "10x"), "argument --until: expected an ISO 8601 time"),
    (("--since", "2026-13-01"), "got '2026-13-01'"),
    (("--limit", "0"), "argument --limit: expected a whole number >= 1, got '0'"),
    (("--limit", "ten"), "argument --limit: expected a whole number >= 1, got 'ten'"),
    (("--batch",), "argument --batch: expected one argument"),
])
def test_alarms_journal_refuses_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["alarms", "journal", "--data-dir", str(tmp_path / "opcua"), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "opcua").exists()                  # nothing opened, nothing made


def test_alarms_journal_refuses_an_empty_interval(tmp_path):
    p = journal_cli(tmp_path, "--since", "1h", "--until", "2h")
    assert p.returncode == 2
    assert "--since" in p.stderr and "must be before --until" in p.stderr
    assert not (tmp_path / "opcua").exists()
