"""plc.alarms: the ISA-18.2 lifecycle as a table (every transition of the diagram, shelving,
suppression, out of service), refusals with their status codes, event ids, persistence, and
through the scan: shelving and disabling never change what the interlocks do.

Pure: every time is an argument (wall-clock epoch seconds for the alarms); no sleeps.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from plc import alarms as al
from plc.alarms import (Alarm, AlarmState, AlarmTransition, Condition, Priority, Refusal,
                        Shelving, acknowledge, add_comment, confirm, set_enabled, shelve,
                        unshelve, update)
from plc.bridge import verdicts_of
from plc.commands import (Acknowledge, AddComment, Confirm, Reset, SetAlarmEnabled, Shelve,
                          StartRecipe, Unshelve)
from plc.runtime import Controller
from plc.scan import ScanContext, scan
from plc.state import PlcState, restored
from plc.contract import ZONES

ID = "zone.pump.over_temp"
T0 = 1_700_000_000.0          # epoch s of the start alarm's last change
NOW = T0 + 100.0
MAX_SHELVE = 8 * 3600.0

N, UA, AA, RTN, SH, SUP, OOS = AlarmState

BASE = Alarm(ID, message="Zone pump: temperature within 60 degC", priority=Priority.CRITICAL,
             trip=True, changed=T0, seq=3)
START = {
    "N": BASE,
    "UA": replace(BASE, active=True, acked=False, active_since=T0),
    "AA": replace(BASE, active=True, confirmed=False, active_since=T0),
    "RTN": replace(BASE, acked=False),
    "SHT": replace(BASE, active=True, active_since=T0, shelving=Shelving.TIMED,
                   unshelve_at=NOW - 1.0),                 # a timed shelve, due before NOW
    "SHTN": replace(BASE, shelving=Shelving.TIMED, unshelve_at=NOW - 1.0),
    "SHT_UA": replace(BASE, active=True, acked=False, active_since=T0,
                      shelving=Shelving.TIMED, unshelve_at=NOW + 60.0),
    "SH1": replace(BASE, active=True, active_since=T0, shelving=Shelving.ONE_SHOT),
    "SUP": replace(BASE, suppressed=True),
    "SUPA": replace(BASE, suppressed=True, active=True, active_since=T0),
    "OOS": replace(BASE, enabled=False),
    "OOSA": replace(BASE, enabled=False, active=True, active_since=T0),
}


def cond(a: Alarm, *, active: bool | None = None, suppressed: bool | None = None,
         priority: Priority = Priority.CRITICAL, message: str = "hot",
         value: float | None = 61.0) -> Condition:
    return Condition(ID, a.active if active is None else active, message, priority, True,
                     value, 60.0, a.suppressed if suppressed is None else suppressed)


def do(a: Alarm, event: str, now: float = NOW):
    """One event on the alarm ``a``: process events through ``update``, operator ones through
    the command functions. Returns (alarms, transitions) or a Refusal."""
    alarms = {ID: a}
    process = {"active": {"active": True}, "clear": {"active": False},
               "suppress": {"suppressed": True}, "unsuppress": {"suppressed": False},
               "scan": {}}
    if event in process:
        return update(alarms, [cond(a, **process[event])], now)
    return {
        "ack": lambda: acknowledge(alarms, ID, "bob", now, "seen"),
        "confirm": lambda: confirm(alarms, ID, "bob", now, "done"),
        "comment": lambda: add_comment(alarms, ID, "bob", now, "checking the pump"),
        "shelve": lambda: shelve(alarms, ID, 600.0, "bob", now, MAX_SHELVE, "maintenance"),
        "shelve1": lambda: shelve(alarms, ID, None, "bob", now, MAX_SHELVE, "known"),
        "unshelve": lambda: unshelve(alarms, ID, "bob", now),
        "disable": lambda: set_enabled(alarms, ID, False, "bob", now, "sensor replaced"),
        "enable": lambda: set_enabled(alarms, ID, True, "bob", now),
    }[event]()


# (start, event) -> (new state, transition kinds) or the refusal's status code
TABLE = [
    # the annunciated part of the diagram (ISA-18.2 §11)
    ("N", "active", UA, ["active"]), ("N", "clear", N, []), ("N", "scan", N, []),
    ("N", "ack", "BadConditionBranchAlreadyAcked"),
    ("N", "confirm", "BadConditionBranchAlreadyConfirmed"),
    ("N", "comment", N, ["comment"]),
    ("UA", "active", UA, []), ("UA", "clear", RTN, ["cleared"]),
    ("UA", "ack", AA, ["acknowledged"]), ("UA", "confirm", "BadConditionBranchAlreadyConfirmed"),
    ("AA", "active", AA, []), ("AA", "clear", N, ["cleared"]),
    ("AA", "ack", "BadConditionBranchAlreadyAcked"), ("AA", "confirm", AA, ["confirmed"]),
    ("RTN", "active", UA, ["active"]), ("RTN", "clear", RTN, []),
    ("RTN", "ack", N, ["acknowledged"]),
    # shelving: timed and one-shot, by the operator, expiry, one-shot ends with the clear
    ("N", "shelve", SH, ["shelved"]), ("N", "shelve1", "BadInvalidState"),
    ("UA", "shelve", SH, ["shelved"]), ("UA", "shelve1", SH, ["shelved"]),
    ("AA", "shelve1", SH, ["shelved"]),
    ("N", "unshelve", "BadConditionNotShelved"),
    ("SHT", "shelve", "BadConditionAlreadyShelved"),
    ("SH1", "shelve1", "BadConditionAlreadyShelved"),
    ("SHT", "scan", UA, ["unshelved"]),            # expired while active: annunciated now
    ("SHTN", "scan", N, ["unshelved"]),
    ("SHTN", "active", UA, ["unshelved", "active"]),
    ("SHT", "unshelve", UA, ["unshelved"]), ("SH1", "unshelve", UA, ["unshelved"]),
    ("SHT_UA", "scan", SH, []), ("SHT_UA", "clear", SH, ["cleared"]),
    ("SHT_UA", "ack", SH, ["acknowledged"]),      # acknowledging a shelved alarm is allowed
    ("SHT_UA", "unshelve", UA, ["unshelved"]),
    ("SH1", "scan", SH, []), ("SH1", "clear", N, ["cleared", "unshelved"]),
    ("SH1", "comment", SH, ["comment"]),
    # suppressed by design
    ("N", "suppress", SUP, ["suppressed"]), ("UA", "suppress", SUP, ["suppressed"]),
    ("SUP", "active", SUP, ["active"]), ("SUP", "unsuppress", N, ["unsuppressed"]),
    ("SUPA", "unsuppress", UA, ["unsuppressed"]), ("SUPA", "clear", SUP, ["cleared"]),
    # out of service: nothing but enable / disable
    ("N", "disable", OOS, ["disabled"]), ("UA", "disable", OOS, ["disabled"]),
    ("SHT_UA", "disable", OOS, ["disabled"]), ("N", "enable", "BadConditionAlreadyEnabled"),
    ("OOS", "disable", "BadConditionAlreadyDisabled"),
    ("OOS", "active", OOS, []), ("OOSA", "clear", OOS, []), ("OOS", "suppress", OOS, []),
    ("OOS", "enable", N, ["enabled"]), ("OOSA", "enable", UA, ["enabled"]),
    *((s, e, "BadConditionDisabled") for s in ("OOS", "OOSA")
      for e in ("ack", "confirm", "comment", "shelve", "shelve1")),
    ("OOS", "unshelve", "BadConditionNotShelved"),
]


@pytest.mark.parametrize("row", TABLE, ids=lambda r: f"{r[0]}-{r[1]}")
def test_lifecycle_table(row):
    start, event, *expected = row
    before = START[start]
    result = do(before, event)
    if isinstance(expected[0], str):
        assert isinstance(result, Refusal) and result.code == expected[0] and result.reason
        return
    new, kinds = expected
    alarms, changes = result
    a = alarms[ID]
    assert a.state is new
    assert [c.kind for c in changes] == kinds
    if not kinds:
        assert a.seq == before.seq and a.changed == before.changed
        return
    # one transition per reported change: each bumps seq, all stamped with the time
    assert a.seq == before.seq + len(kinds) and a.changed == NOW
    assert [c.alarm.seq for c in changes] == list(range(before.seq + 1, a.seq + 1))
    assert changes[0].old is before.state and changes[-1].new is new and changes[-1].alarm == a
    assert all(c.time == NOW and c.id == ID for c in changes)
    for prev, nxt in zip(changes, changes[1:]):
        assert nxt.old is prev.new
    # the process condition is followed whatever is annunciated
    if event in ("active", "clear"):
        assert a.active is (event == "active")


def test_operator_transitions_carry_user_and_comment():
    alarms, (c,) = do(START["UA"], "ack")
    assert (c.user, c.comment, alarms[ID].user, alarms[ID].comment) == ("bob", "seen", "bob", "seen")
    assert not alarms[ID].confirmed                      # acknowledge asks for a confirm
    alarms, (c,) = confirm(alarms, ID, "carol", NOW + 1, "fixed")
    assert alarms[ID].confirmed and (c.user, c.comment) == ("carol", "fixed")


def test_timed_shelve_ends_at_unshelve_at_by_the_system():
    alarms, _ = do(START["UA"], "shelve")
    a = alarms[ID]
    assert (a.shelving, a.unshelve_at, a.state) == (Shelving.TIMED, NOW + 600.0, SH)
    c = cond(a)
    alarms, changes = update(alarms, [c], NOW + 599.9)
    assert changes == [] and alarms[ID].state is SH
    alarms, (ch,) = update(alarms, [c], NOW + 600.0)
    assert (ch.kind, ch.user, ch.new) == ("unshelved", al.SYSTEM, UA)
    assert alarms[ID].unshelve_at is None


@pytest.mark.parametrize("duration", [0.0, -1.0, MAX_SHELVE + 1, float("nan"), float("inf")])
def test_shelving_time_out_of_range(duration):
    r = shelve({ID: START["UA"]}, ID, duration, "bob", NOW, MAX_SHELVE)
    assert isinstance(r, Refusal) and r.code == "BadShelvingTimeOutOfRange"


def test_shelving_time_at_the_maximum_is_accepted():
    alarms, _ = shelve({ID: START["UA"]}, ID, MAX_SHELVE, "bob", NOW, MAX_SHELVE)
    assert alarms[ID].unshelve_at == NOW + MAX_SHELVE


def test_disable_drops_the_shelve_and_pending_acknowledgement():
    alarms, _ = do(START["SHT_UA"], "disable")
    a = alarms[ID]
    assert (a.enabled, a.shelving, a.unshelve_at, a.acked, a.confirmed, a.retain) == (
        False, Shelving.UNSHELVED, None, True, True, False)


def test_disabled_alarm_follows_the_process_silently_and_is_annunciated_when_enabled():
    alarms, _ = do(START["N"], "disable")
    alarms, changes = update(alarms, [cond(alarms[ID], active=True)], NOW + 1)
    assert changes == [] and alarms[ID].active and alarms[ID].state is OOS
    alarms, (c,) = set_enabled(alarms, ID, True, "bob", NOW + 2)
    assert (c.kind, c.old, c.new) == ("enabled", OOS, UA)


@pytest.mark.parametrize("start, retain", [
    ("N", False), ("UA", True), ("AA", True), ("RTN", True), ("SH1", True), ("OOSA", False)])
def test_retain(start, retain):
    assert START[start].retain is retain


def test_priority_change_while_active_is_a_message_transition_other_changes_are_silent():
    alarms, _ = do(START["N"], "active")
    a = alarms[ID]
    alarms, changes = update(alarms, [cond(a, value=62.5, message="hotter")], NOW + 1)
    assert changes == [] and alarms[ID].value == 62.5 and alarms[ID].message == "hot"
    alarms, (c,) = update(alarms, [cond(a, priority=Priority.HIGH, message="hot, lower")],
                          NOW + 2)
    assert (c.kind, c.alarm.priority, c.alarm.message) == ("message", Priority.HIGH, "hot, lower")


def test_message_value_and_limit_come_from_the_condition_in_both_directions():
    alarms, (c,) = update({}, [Condition(ID, True, "Zone pump: over-temperature 61.0 degC > 60 degC",
                                         Priority.CRITICAL, True, 61.0, 60.0)], NOW)
    assert (c.alarm.value, c.alarm.limit, c.alarm.active_since) == (61.0, 60.0, NOW)
    alarms, (c,) = update(alarms, [Condition(ID, False, "Zone pump: back within 60 degC (59.8 degC)",
                                             Priority.CRITICAL, True, 59.8, 60.0)], NOW + 5)
    assert c.alarm.message == "Zone pump: back within 60 degC (59.8 degC)"
    assert c.alarm.value == 59.8 and c.alarm.active_since is None


def test_acknowledge_all_takes_every_enabled_unacknowledged_alarm():
    alarms = {k: replace(a, id=k) for k, a in START.items()}
    out, changes = acknowledge(alarms, None, "carol", NOW)
    assert sorted(c.id for c in changes) == ["RTN", "SHT_UA", "UA"]
    assert all(out[c.id].acked and out[c.id].user == "carol" for c in changes)
    assert all(out[k] == alarms[k] for k in alarms if k not in ("RTN", "SHT_UA", "UA"))
    assert acknowledge(out, None, "carol", NOW) == (out, [])    # nothing left: not refused


@pytest.mark.parametrize("fn", [
    lambda a: acknowledge(a, "nope", "u", NOW), lambda a: confirm(a, "nope", "u", NOW),
    lambda a: add_comment(a, "nope", "u", NOW, "x"), lambda a: unshelve(a, "nope", "u", NOW),
    lambda a: shelve(a, "nope", 60.0, "u", NOW, MAX_SHELVE),
    lambda a: set_enabled(a, "nope", False, "u", NOW)])
def test_unknown_alarm_is_an_unknown_event(fn):
    r = fn({ID: START["UA"]})
    assert isinstance(r, Refusal) and r.code == "BadEventIdUnknown" and "nope" in r.reason


def test_event_id_is_unique_per_change_and_stale_ids_are_refused():
    alarms, ids = {}, set()
    steps = [lambda a: update(a, [cond(BASE, active=True)], NOW),
             lambda a: update(a, [cond(BASE, active=False)], NOW),       # same time, new seq
             lambda a: update(a, [cond(BASE, active=True)], NOW + 1),
             lambda a: add_comment(a, ID, "bob", NOW + 2, "looking")]
    for step in steps:
        alarms, changes = step(alarms)
        for c in changes:
            assert c.alarm.event_id not in ids
            ids.add(c.alarm.event_id)
    a = alarms[ID]
    assert a.event_id == f"{ID}#{a.seq}#{round(a.changed * 1e6)}".encode()
    stale = sorted(ids - {a.event_id})[0]
    for fn in (acknowledge, confirm):
        r = fn(alarms, ID, "bob", NOW + 3, "", stale)
        assert isinstance(r, Refusal) and r.code == "BadEventIdUnknown"
    r = add_comment(alarms, ID, "bob", NOW + 3, "x", stale)
    assert isinstance(r, Refusal) and r.code == "BadEventIdUnknown"
    out, (c,) = acknowledge(alarms, ID, "bob", NOW + 3, "", a.event_id)
    assert c.kind == "acknowledged"


def test_inputs_are_not_mutated():
    before = {ID: START["UA"]}
    copy = dict(before)
    update(before, [cond(START["UA"], active=False)], NOW)
    acknowledge(before, None, "bob", NOW)
    shelve(before, ID, 60.0, "bob", NOW, MAX_SHELVE)
    set_enabled(before, ID, False, "bob", NOW)
    assert before == copy


def test_new_alarm_starts_with_its_condition_and_suppression_silently():
    alarms, changes = update({}, [Condition(ID, False, "ok", Priority.HIGH, True, None, 60.0, True)],
                             NOW)
    assert changes == [] and alarms[ID].state is SUP and alarms[ID].limit == 60.0


# --- persistence ----------------------------------------------------------------------------

def test_persistence_round_trip_keeps_the_lifecycle(program):
    alarms = {k: replace(a, id=k, value=None) for k, a in START.items()}
    s = PlcState(alarms=alarms)
    data = json.loads(json.dumps(s.persistent()))
    assert data["version"] == 2
    back = restored(data, program.recipes, ZONES)
    assert dict(back.alarms) == alarms
    assert back.alarms["UA"].state is UA and back.alarms["SHT_UA"].unshelve_at == NOW + 60.0
    assert back.alarms["UA"].event_id == alarms["UA"].event_id


def test_version_1_file_is_read_without_alarms(program):
    back = restored({"version": 1, "phase": "idle", "trips": ["estop"], "first_out": "estop"},
                    program.recipes, ZONES)
    assert back.alarms == {} and back.trips == {"estop"}


def test_alarms_of_unknown_zones_are_dropped_on_restore(program):
    data = PlcState(alarms={"zone.gone.over_temp": Alarm("zone.gone.over_temp"),
                            "estop": Alarm("estop")}).persistent()
    assert set(restored(data, program.recipes, ZONES).alarms) == {"estop"}


# --- through the scan -----------------------------------------------------------------------

DT = 0.1


def run_scan(program, s, image, cmds=(), tick=0, wall=T0):
    return scan(program, s, image, list(cmds), ScanContext(tick, DT, tick * DT, wall_s=wall + tick * DT))


def test_alarm_events_carry_the_data_keys_and_wall_time(program, make_inputs):
    r = run_scan(program, PlcState(), make_inputs(temp_pump=61.0, estop_ok=True))
    (e,) = [e for e in r.events if e.kind == "alarm" and e.get("alarm_id") == ID]
    assert e.time_s == T0
    assert [k for k, _ in e.data] == ["alarm_id", "transition", "from", "to", "priority", "user",
                                      "comment", "value", "batch_id", "recipe_id", "alarm"]
    assert (e.get("transition"), e.get("from"), e.get("to"), e.get("priority"), e.get("value")) == (
        "active", "normal", "unacknowledged_active", 900, 61.0)
    a = e.get("alarm")
    assert isinstance(a, Alarm) and a.changed == T0 and a.active_since == T0
    assert r.state.alarms[ID] == a


def test_snapshot_alarms_are_every_alarm_sorted_by_id(program, make_inputs):
    c = Controller(program)
    r = c.cycle(make_inputs(), 0.0, wall_s=T0)
    snap = c.snapshot(r, make_inputs(), 0.0)
    ids = [a.id for a in snap.alarms]
    from plc.interlocks import condition_ids
    assert ids == sorted(condition_ids(program))


def test_first_scan_after_a_start_reports_the_alarm_system(program, make_inputs, tmp_path):
    from plc.persist import StateStore
    store = StateStore(tmp_path / "state.json", background=False)
    c = Controller(program, store=store)
    r = c.cycle(make_inputs(temp_pump=61.0), 0.0, wall_s=T0)
    (e,) = [e for e in r.events if e.kind == "alarm_system"]
    assert e.message == "PLC started: 0 alarms restored, 0 unacknowledged"
    assert (e.get("transition"), e.get("restored"), e.get("unacknowledged")) == ("restart", 0, 0)
    assert not [e for e in c.cycle(make_inputs(temp_pump=61.0), 0.1, wall_s=T0 + 0.1).events
                if e.kind == "alarm_system"]
    # shelve one alarm, leave the over-temperature unacknowledged; kill -9 and restart
    c.submit(Shelve("io.uncertain", 3600.0, user="op"))
    c.cycle(make_inputs(temp_pump=61.0), 0.2, wall_s=T0 + 0.2)
    c2 = Controller(program, store=StateStore(tmp_path / "state.json", background=False))
    assert not c2.state.alarms[ID].acked and c2.state.alarms["io.uncertain"].state is SH
    r = c2.cycle(make_inputs(temp_pump=61.0), 0.0, wall_s=T0 + 10)
    (e,) = [e for e in r.events if e.kind == "alarm_system"]
    n = len(c.state.alarms)
    assert e.message == f"PLC started: {n} alarms restored, 1 unacknowledged"
    assert c2.state.alarms[ID].state is UA and c2.state.alarms["io.uncertain"].state is SH
    assert c2.state.trips == {ID}


def test_reset_waits_for_the_first_evaluation_after_a_start(program, make_inputs):
    s = PlcState(trips=frozenset({"estop"}), first_out="estop", alarms={"estop": Alarm("estop")},
                 restarted=True)
    r = run_scan(program, s, make_inputs(), [Reset(id="r1")])
    (v,) = verdicts_of(r.events)
    assert not v.accepted and v.code == "BadInvalidState" and "estop" in v.reason
    r = run_scan(program, r.state, make_inputs(), [Reset(id="r2")], tick=1)
    assert verdicts_of(r.events)[0].accepted


@pytest.mark.parametrize("how", ["shelve", "shelve1", "disable"])
def test_shelved_or_disabled_over_temperature_still_trips_and_reset_sees_it(rig, program, how):
    r = rig()
    r.scan()                                                   # every alarm exists
    r.set(pump=61.0)
    r.scan()                                                   # active, tripped
    assert r.state.trips == {ID}
    cmd = {"shelve": Shelve(ID, 600.0, user="op", id="c1"),
           "shelve1": Shelve(ID, None, user="op", id="c1"),
           "disable": SetAlarmEnabled(ID, False, user="op", id="c1")}[how]
    res = r.scan(cmd, Acknowledge(None, user="op"))
    assert verdicts_of(res.events)[0].accepted
    assert r.state.alarms[ID].state in (SH, OOS)
    # still hot: Reset refused on the raw condition, the trip holds, outputs safe
    res = r.scan(Reset(user="op", id="c2"))
    (v,) = [v for v in verdicts_of(res.events) if v.command_id == "c2"]
    assert not v.accepted and ID in v.reason and r.state.trips == {ID}
    r.set(pump=40.0)
    r.run(1.0)
    assert not r.state.alarms[ID].active
    assert r.state.alarms[ID].state is (OOS if how == "disable" else
                                        N if how == "shelve1" else SH)
    res = r.scan(Reset(user="op", id="c3"))
    assert verdicts_of(res.events)[0].accepted and not r.state.trips
    r.scan(StartRecipe("dark-70", user="op"))
    r.set(pump=61.0)
    r.scan()                                 # while shelved / out of service: trips again
    assert r.state.trips == {ID} and r.state.phase.value == "fault"
    assert all(o.value is False for n, o in r.last.outputs.items() if n.startswith("heater"))


def test_disabled_alarm_reports_nothing_but_its_trip_does(rig):
    r = rig()
    r.scan()
    r.scan(SetAlarmEnabled(ID, False, user="op"))
    r.events.clear()
    r.set(pump=61.0)
    r.scan()
    assert not [e for e in r.events if e.kind == "alarm" and e.get("alarm_id") == ID]
    assert [e.get("alarm_id") for e in r.events if e.kind == "trip"] == [ID]


@pytest.mark.parametrize("cmd, code", [
    (Acknowledge(ID), "BadConditionBranchAlreadyAcked"),
    (Acknowledge("nope"), "BadEventIdUnknown"),
    (Acknowledge(ID, event_id=b"zone.pump.over_temp#7#0"), "BadEventIdUnknown"),
    (Confirm(ID), "BadConditionBranchAlreadyConfirmed"),
    (AddComment("nope", "x"), "BadEventIdUnknown"),
    (Shelve(ID, 0.0), "BadShelvingTimeOutOfRange"),
    (Shelve(ID, 9 * 3600.0), "BadShelvingTimeOutOfRange"),
    (Shelve(ID), "BadInvalidState"),
    (Unshelve(ID), "BadConditionNotShelved"),
    (SetAlarmEnabled(ID, True), "BadConditionAlreadyEnabled"),
    (StartRecipe("nope"), "BadInvalidState"),
])
def test_refused_commands_carry_their_code_to_the_verdict(rig, cmd, code):
    r = rig()
    r.scan()
    res = r.scan(replace(cmd, id="x1", user="op"))
    (e,) = [e for e in res.events if e.kind == "command_refused"]
    assert e.get("code") == code and e.get("reason")
    (v,) = verdicts_of(res.events)
    assert (v.accepted, v.code, v.reason) == (False, code, e.get("reason"))


def test_accepted_alarm_command_verdict_has_no_code_and_its_event_follows(rig):
    r = rig()
    r.scan()
    res = r.scan(AddComment(ID, "checked", user="op", id="x2",
                            event_id=r.state.alarms[ID].event_id))
    (v,) = verdicts_of(res.events)
    assert v.accepted and v.code == ""
    (e,) = [e for e in res.events if e.kind == "alarm"]
    assert (e.get("transition"), e.get("user"), e.get("comment")) == ("comment", "op", "checked")


def test_transition_record_equality_is_by_value():
    a = Alarm(ID)
    assert AlarmTransition(ID, "active", 1.0, N, UA, a) == AlarmTransition(ID, "active", 1.0, N, UA, a)


def test_historian_writes_the_scalar_keys_of_alarm_events_never_the_record(program, make_inputs):
    from historian.schema import Sampler
    c = Controller(program)
    img = make_inputs(temp_pump=61.0)
    r = c.cycle(img, T0, wall_s=T0)
    lines = Sampler("m").lines(c.snapshot(r, img, T0))
    (alarm,) = [x for x in lines if x.startswith("alarm,") and "zone.pump.over_temp" in x]
    assert 'transition="active"' in alarm and "value=61.0" in alarm
    assert 'state="unacknowledged_active"' in alarm and "Alarm(" not in alarm
    assert any(x.startswith("event,") and "kind=alarm_system" in x for x in lines)


def test_suppression_and_its_end_carry_the_conditions_message_of_the_moment():
    dev = "zone.pump.deviation_warning"
    suppressed = Condition(dev, False, "Zone pump: deviation not monitored (no set-point)",
                           Priority.MEDIUM, suppressed=True)
    watched = Condition(dev, False, "Zone pump: deviation within 1 K (0.2 K)", Priority.MEDIUM)
    alarms, _ = al.update({}, [suppressed], 10.0)
    alarms, changes = al.update(alarms, [watched], 11.0)
    assert [c.kind for c in changes] == ["unsuppressed"]
    assert changes[0].alarm.message == "Zone pump: deviation within 1 K (0.2 K)"
    alarms, changes = al.update(alarms, [suppressed], 12.0)
    assert [c.kind for c in changes] == ["suppressed"]
    assert changes[0].alarm.message == "Zone pump: deviation not monitored (no set-point)"
