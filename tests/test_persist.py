"""plc.state persistence and plc.persist: what survives a restart, and how it is written.

Only tmp_path is touched. The background writer of StateStore is a real thread; the test waits
for it with ``close()`` (a join), never with a sleep.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from plc import persist
from plc.commands import Abort, Hold, Reset, Resume, SetManual, SetTrim, StartRecipe
from plc.persist import StateStore, read, write_atomic
from plc.contract import OUTPUT_SPECS, ZONES
from plc.state import Phase, PlcState, restored

ALL_OFF = {n: False for n in OUTPUT_SPECS}


def outs(r) -> dict[str, bool]:
    return {n: bool(pt.value) for n, pt in r.outputs.items()}


def roundtrip(state: PlcState, program) -> PlcState:
    """Through JSON, as the file would carry it."""
    data = json.loads(json.dumps(state.persistent()))
    return restored(data, program.recipes, ZONES)


@pytest.fixture(scope="module")
def pouring_state(rig, program):
    """A dark-70 batch in pouring, released, with a trim and a manual zone."""
    r = rig()
    r.scan(StartRecipe("dark-70", user="op"), SetTrim("pump", 0.5), SetManual("fountain", 10.0))
    r.set_all(48.0).set(pump=48.5)               # the pump zone's goal carries the trim
    r.run(200, until=lambda x: x.state.phase is Phase.COOLING)
    r.set(tank_bottom=27.5, tank_wall=27.5, pump=28.0, fountain=27.5)
    r.run(200, until=lambda x: x.state.phase is Phase.POURING)
    r.set(tank_bottom=31.5, tank_wall=31.5, pump=32.0, fountain=31.5)
    r.run(200, until=lambda x: x.state.pouring_released)
    r.run(5)
    assert r.state.pouring_released and outs(r.last)["pump"]
    return r.state, dict(r.temps)


# --- persistent() / restored() ----------------------------------------------------------------

def test_persistent_is_json_and_complete(pouring_state):
    s, _ = pouring_state
    data = s.persistent()
    assert json.loads(json.dumps(data)) == data
    alarms = data.pop("alarms")
    assert data == {
        "version": 2, "phase": "pouring", "recipe_id": "dark-70",
        "batch_id": "tempering-01-000001", "batch_seq": 1, "held": False, "interrupted": False,
        "tempered": True, "trips": [], "first_out": None, "trims": {"pump": 0.5},
        "manual": {"fountain": 10.0}, "tuning": {}}
    assert list(alarms) == sorted(s.alarms) and set(alarms["estop"]) == {
        "active", "acked", "confirmed", "enabled", "suppressed", "shelving", "unshelve_at",
        "message", "priority", "trip", "active_since", "changed", "user", "comment", "seq"}


def test_running_batch_comes_back_interrupted(pouring_state, program):
    s, _ = pouring_state
    back = roundtrip(s, program)
    assert back.phase is Phase.POURING and back.interrupted
    assert (back.recipe_id, back.batch_id, back.batch_seq, back.tempered) == (
        "dark-70", "tempering-01-000001", 1, True)
    assert dict(back.trims) == {"pump": 0.5} and dict(back.manual) == {"fountain": 10.0}
    assert not back.pouring_released and not back.pump_ready     # runtime state starts over


@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.STOPPED, Phase.FAULT])
def test_non_running_phase_is_not_interrupted(program, phase):
    back = roundtrip(PlcState(phase=phase, recipe_id="dark-70", interrupted=True), program)
    assert back.phase is phase and not back.interrupted


def test_outputs_stay_off_until_resume(rig, program, pouring_state):
    s, temps = pouring_state
    r = rig(state=roundtrip(s, program), temps=temps)
    for x in r.run(30):                                 # 30 s: well past every delay
        assert outs(x) == ALL_OFF and not x.demands.control
    assert r.state.phase is Phase.POURING and r.state.interrupted
    assert [e.get("reason") for e in r.scan(Hold()).events if e.kind == "command_refused"] == [
        "the batch is interrupted; resume or abort it"]
    res = r.scan(Resume(user="op"))
    assert not r.state.interrupted
    assert outs(res)["mixer"]                            # the mixer restarts first
    assert not outs(res)["pump"]                         # the pump waits for its checks again
    r.run(program.sequence.pump_delay_s + 1.0)
    assert outs(r.last)["pump"]


def test_interrupted_batch_can_be_aborted(rig, program, pouring_state):
    s, temps = pouring_state
    r = rig(state=roundtrip(s, program), temps=temps)
    r.scan(Abort(user="op"))
    assert r.state.phase is Phase.STOPPED and not r.state.interrupted
    assert [e.get("outcome") for e in r.kinds("batch_end")] == ["aborted"]


def test_latched_trips_survive_a_restart(rig, program):
    r = rig()
    r.scan(StartRecipe("dark-70"))
    r.overrides["estop_ok"] = False
    r.scan()
    assert r.state.phase is Phase.FAULT
    back = roundtrip(r.state, program)
    assert back.trips == {"estop"} and back.first_out == "estop" and back.phase is Phase.FAULT
    r2 = rig(state=back)
    r2.overrides["estop_ok"] = False
    r2.run(1)                                            # condition still there after restart
    refusal = [e.get("reason") for e in r2.scan(StartRecipe("dark-70")).events
               if e.kind == "command_refused"]
    assert refusal == ["a trip is latched (first-out: estop); reset first"]
    assert [e.get("reason") for e in r2.scan(Reset()).events if e.kind == "command_refused"] == [
        "conditions still active: estop"]
    r2.overrides.clear()
    r2.scan()
    r2.scan(Reset(user="op"))
    assert r2.state.phase is Phase.IDLE and not r2.state.trips
    assert all(outs(x) == ALL_OFF for x in r2.run(5))


@pytest.mark.parametrize("data", [
    None, {},
    {"phase": "no-such-phase"},
    {"phase": "heating", "batch_seq": "many"},
    {"phase": "idle", "trims": ["pump", 1.0]},
    {"phase": "idle", "manual": {"pump": "full"}},
    {"phase": 3},
])
def test_damaged_content_gives_the_safe_default(program, data):
    assert restored(data, program.recipes, ZONES) == PlcState()


def test_unknown_recipe_of_a_running_batch_stops_it(program):
    back = restored({"phase": "cooling", "recipe_id": "gone", "batch_id": "b"}, program.recipes,
                    ZONES)
    assert back.phase is Phase.STOPPED and back.recipe_id is None and not back.interrupted


def test_unknown_zones_are_dropped(program):
    back = restored({"phase": "idle", "trims": {"pump": 1, "attic": 2},
                     "manual": {"attic": 5, "fountain": -3}}, program.recipes, ZONES)
    assert dict(back.trims) == {"pump": 1.0} and dict(back.manual) == {"fountain": -3.0}


# --- files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{", b"[1, 2]", b"\xff\xfe\x00garbage", b"", b"null",
                                     b'{"phase": "idle"} trailing'])
def test_damaged_file_is_moved_aside(tmp_path, program, content, caplog):
    path = tmp_path / "plc-state.json"
    path.write_bytes(content)
    assert read(path) is None
    assert not path.exists()
    assert (tmp_path / "plc-state.json.corrupt").read_bytes() == content
    assert "unreadable PLC state" in caplog.text
    assert restored(StateStore(path, background=False).load(), program.recipes, ZONES) == PlcState()


def test_missing_file_is_the_default(tmp_path):
    assert read(tmp_path / "none.json") is None
    assert not (tmp_path / "none.json.corrupt").exists()


def test_write_atomic_roundtrip(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_atomic(path, {"a": 1})
    write_atomic(path, {"a": 2, "b": [1]})
    assert read(path) == {"a": 2, "b": [1]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_write_atomic_failure_leaves_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_atomic(path, {"phase": "fault", "trips": ["estop"]})
    old = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(persist.os, "replace", boom)
    with pytest.raises(OSError):
        write_atomic(path, {"phase": "idle"})
    assert path.read_bytes() == old
    monkeypatch.undo()
    assert read(path) == {"phase": "fault", "trips": ["estop"]}


def test_write_atomic_failure_while_writing_leaves_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_atomic(path, {"v": 1})

    def boom(fd):
        raise OSError(5, "I/O error")
    monkeypatch.setattr(persist.os, "fsync", boom)
    with pytest.raises(OSError):
        write_atomic(path, {"v": 2})
    monkeypatch.undo()
    assert read(path) == {"v": 1}


def test_state_store_background_lands_the_last_content(tmp_path):
    path = tmp_path / "state.json"
    store = StateStore(path)
    for k in range(200):
        store.save({"seq": k})
    store.close()
    assert read(path) == {"seq": 199}
    assert store.errors == 0


def test_state_store_close_is_idempotent_and_foreground_writes_at_once(tmp_path):
    path = tmp_path / "state.json"
    store = StateStore(path, background=False)
    store.save({"x": 1})
    assert read(path) == {"x": 1}
    store.close()
    store.close()


def test_state_store_skips_unchanged_content(tmp_path, monkeypatch):
    writes = []
    monkeypatch.setattr(persist, "write_atomic", lambda p, d: writes.append(d))
    store = StateStore(tmp_path / "s.json", background=False)
    for d in ({"a": 1}, {"a": 1}, {"a": 2}, {"a": 2}, {"a": 1}):
        store.save(d)
    assert writes == [{"a": 1}, {"a": 2}, {"a": 1}]


def test_state_store_retries_after_a_failed_write(tmp_path, monkeypatch, caplog):
    """A write that failed must be retried on the next save even if the content is the same
    (a latched trip in a steady Fault state would otherwise never reach the disk)."""
    path = tmp_path / "s.json"
    real = persist.write_atomic
    fail = [True]

    def flaky(p, d):
        if fail[0]:
            raise OSError(28, "No space left on device")
        real(p, d)
    monkeypatch.setattr(persist, "write_atomic", flaky)
    store = StateStore(path, background=False)
    data = {"phase": "fault", "trips": ["estop"]}
    store.save(data)
    assert store.errors == 1 and not path.exists()
    store.save(dict(data))
    assert store.errors == 2
    assert caplog.text.count("cannot persist PLC state") == 1     # logged once per outage
    fail[0] = False
    store.save(dict(data))
    assert read(path) == data
    assert "persisted again" in caplog.text


def test_state_store_with_the_scan(tmp_path, rig, program):
    """What the runtime does: save every scan's persistent() and come back from the file."""
    path = tmp_path / "state.json"
    store = StateStore(path)
    r = rig()
    r.scan(StartRecipe("milk-35", user="op"), SetTrim("tank_wall", -1.0))
    for _ in range(20):
        store.save(r.scan().state.persistent())
    store.close()
    back = restored(StateStore(path, background=False).load(), program.recipes, ZONES)
    assert back.phase is Phase.HEATING and back.interrupted and back.recipe_id == "milk-35"
    assert dict(back.trims) == {"tank_wall": -1.0}
