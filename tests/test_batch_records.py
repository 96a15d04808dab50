"""Batch records in the records database (``Records.save_batch``, ``batch``, ``batches``,
``next_batch_seq``): the same contract on SQLite and a real PostgreSQL; a schema 3 database
upgraded; the batch numbering continued from the records by a PLC that lost its state."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, text

from batch_samples import T0, record
from opcua_server import records as records_module
from opcua_server.records import BatchSummary, Records, batch_seq_of, validate_recipe
from plc.config import Recipe


def test_a_record_is_stored_whole_and_read_back(records):
    rec = record(7, verdict="FAIL", reasons=("pouring within ±0.5 K for 80.0 % of the time",))
    records.save_batch(rec)
    assert records.batch("tm-1-000007") == rec
    assert records.batch("tm-1-000008") is None
    assert records.batches() == [BatchSummary("tm-1-000007", "tm-1", "dark", T0, T0 + 5400,
                                              "completed", "FAIL", rec.reasons)]


def test_saving_a_batch_again_replaces_it(records):
    records.save_batch(record(7, verdict="INCOMPLETE", reasons=("no pouring",)))
    records.save_batch(record(7, verdict="PASS"))
    assert [(s.batch_id, s.verdict, s.reasons) for s in records.batches()] == [("tm-1-000007", "PASS", ())]
    assert records.batch("tm-1-000007").verdict == "PASS"


def test_a_refused_record_changes_nothing(records):
    records.save_batch(record(7))
    with pytest.raises(ValueError, match="verdict"):
        records.save_batch(record(7, verdict="MAYBE"))
    assert records.batch("tm-1-000007").verdict == "PASS"


def test_list_by_time_verdict_and_limit(records):
    verdicts = ["PASS", "FAIL", "PASS", "INCOMPLETE", "FAIL"]
    for i, v in enumerate(verdicts):             # one batch every two hours, stored out of order
        records.save_batch(record(10 - i, start_s=T0 + (4 - i) * 7200, verdict=v))
    ids = lambda rows: [r.batch_id[-2:] for r in rows]              # noqa: E731
    assert ids(records.batches()) == ["06", "07", "08", "09", "10"]    # oldest first
    assert ids(records.batches(since=T0 + 7200)) == ["07", "08", "09", "10"]
    since = datetime.fromtimestamp(T0 + 7200, timezone.utc).replace(tzinfo=None)   # naive: UTC
    assert ids(records.batches(since=since, until=T0 + 3 * 7200)) == ["07", "08"]
    assert ids(records.batches(verdict="FAIL")) == ["06", "09"]
    assert ids(records.batches(limit=2)) == ["09", "10"]               # the newest two
    assert ids(records.batches(verdict="PASS", limit=1)) == ["10"]
    assert records.batches(limit=0) == []
    with pytest.raises(ValueError, match="verdict"):
        records.batches(verdict="pass")
    with pytest.raises(ValueError, match="limit"):
        records.batches(limit=-1)


def test_the_list_never_reads_a_records_json(records):
    records.save_batch(record(7))
    with records.engine.begin() as db:      # a record damaged behind our back
        db.execute(text("UPDATE batches SET record = 'not json'"))
    assert [s.batch_id for s in records.batches()] == ["tm-1-000007"]
    with pytest.raises(json.JSONDecodeError):
        records.batch("tm-1-000007")


def test_next_batch_seq_is_the_machines_highest_plus_one(records):
    assert records.next_batch_seq("tm-1") == 1
    for seq in (3, 122, 17):
        records.save_batch(record(seq))
    records.save_batch(record(500, machine="tm-2"))
    records.save_batch(record(9, batch_id="tm-1-manual-test"))      # not of the PLC's form
    assert records.next_batch_seq("tm-1") == 123
    assert records.next_batch_seq("tm-2") == 501
    assert records.next_batch_seq("tm-3") == 1


@pytest.mark.parametrize("batch_id, machine, seq", [
    ("tm-1-000123", "tm-1", 123), ("tm-1-1234567", "tm-1", 1234567), ("tm-1-000123", "tm-2", None),
    ("tm-1-x", "tm-1", None), ("000123", "", None), ("tm-1-", "tm-1", None)])
def test_batch_seq_of(batch_id, machine, seq):
    assert batch_seq_of(batch_id, machine) == seq


def test_a_thousand_batches_list_fast(records):
    rows = [record(i, start_s=T0 + i * 3600) for i in range(1, 1001)]
    for r in rows:
        records.save_batch(r)
    started = time.perf_counter()
    listed = records.batches(verdict="PASS", since=T0 + 500 * 3600)
    assert len(listed) == 501 and time.perf_counter() - started < 1.0


def test_a_schema_3_database_gets_the_batches(tmp_path):
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as db:
        db.execute(text("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)"))
        db.execute(text("INSERT INTO meta VALUES ('schema', '3')"))
        db.execute(text("CREATE TABLE audit (id INTEGER PRIMARY KEY, time TEXT NOT NULL, user_name TEXT "
                        "NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, old_value TEXT, new_value "
                        "TEXT, result TEXT NOT NULL, command_id TEXT, origin TEXT, peer TEXT, "
                        "certificate TEXT)"))
        db.execute(text("INSERT INTO audit (time, user_name, action, target, result) VALUES "
                        "('2026-01-01T00:00:00.000Z', 'olga', 'call', 'Hold', 'Good')"))
        db.execute(text("CREATE TABLE recipes (id VARCHAR(64) PRIMARY KEY, name TEXT NOT NULL, "
                        "heating_goal FLOAT NOT NULL, cooling_goal FLOAT NOT NULL, pouring_goal FLOAT "
                        "NOT NULL, working_max FLOAT NOT NULL, mixer_enabled BOOLEAN NOT NULL, "
                        "fountain_enabled BOOLEAN NOT NULL, mold_heater_enabled BOOLEAN NOT NULL, "
                        "vibration_enabled BOOLEAN NOT NULL, vib_heater_enabled BOOLEAN NOT NULL, "
                        "pedal VARCHAR(16) NOT NULL, pedal_on_time FLOAT NOT NULL, pedal_off_time "
                        "FLOAT NOT NULL)"))
        db.execute(text("INSERT INTO recipes VALUES ('dark', 'Dark', 45, 27, 31.5, 32.5, 1, 1, 1, 0, 0, "
                        "'auto', 1.0, 2.0)"))
    engine.dispose()
    r = Records(f"sqlite:///{path}")
    try:
        assert r.audit_entries()[0]["target"] == "Hold"
        dark = r.load_recipes()["dark"]
        assert dark == validate_recipe("dark", {k: v for k, v in dark.items() if k != "acceptance"})
        r.save_batch(record(41))
        assert r.next_batch_seq("tm-1") == 42
        with r.engine.connect() as db:
            assert db.execute(text("SELECT value FROM meta WHERE key = 'schema'")).scalar_one() \
                == records_module.SCHEMA_VERSION
    finally:
        r.close()
    again = Records(f"sqlite:///{path}")          # and opens again as it is
    try:
        assert again.batch("tm-1-000041") == record(41)
    finally:
        again.close()


@pytest.mark.skipif("acceptance" not in Recipe.model_fields, reason="recipes without acceptance criteria")
def test_a_recipes_acceptance_criteria_are_stored(records):
    fields = {"name": "Dark", "heating_goal": 45, "cooling_goal": 27, "pouring_goal": 31.5,
              "working_max": 32.5, "mixer_enabled": True, "fountain_enabled": True,
              "mold_heater_enabled": True, "vibration_enabled": False, "vib_heater_enabled": False,
              "pedal": "auto", "pedal_on_time": 1.0, "pedal_off_time": 2.0}
    records.save_recipe("dark", {**fields, "acceptance": {"pouring_min_share": 0.8}})
    records.save_recipe("milk", fields)
    book = records.load_recipes()
    assert book["dark"]["acceptance"]["pouring_min_share"] == 0.8
    assert book["milk"]["acceptance"] == Recipe.model_fields["acceptance"].default.model_dump()


async def test_the_window_raises_the_plcs_floor_after_each_record_it_stores(tmp_path):
    """The window's batch task stores each finished record, then hands its number to the PLC
    (``stored``: ``PlcClient.set_batch_floor``)."""
    import asyncio
    from dataclasses import dataclass

    from plc.channel import SnapshotChannel
    from tempering.window_process import batches_task

    @dataclass(frozen=True)
    class Snap:                          # what the task reads of a plc.channel.Snapshot
        tick: int
        time_s: float

    class Recorder:                      # a record at ticks 3 and 5
        def feed(self, snap):
            return {3: record(122), 5: record(123, batch_id="tm-1-manual")}.get(snap.tick)

        def current(self):
            return None

    r = Records(f"sqlite:///{tmp_path / 'tempering.db'}")
    floors: list[int] = []
    channel, stop = SnapshotChannel(), asyncio.Event()
    task = asyncio.create_task(batches_task(channel, channel.subscribe(maxlen=64), Recorder(), r, None, None,
                                        stop, stored=floors.append))
    for tick in range(6):
        channel.publish(Snap(tick, T0 + tick))
    stop.set()
    await asyncio.wait_for(task, 10)
    assert floors == [122]               # the manual id is no number of the PLC's
    assert [s.batch_id for s in r.batches()] == ["tm-1-000122", "tm-1-manual"]
    r.close()
