"""plc.alarms: the ISA-18.2 state diagram as a table, acknowledge, timestamps, transitions."""

from __future__ import annotations

import pytest

from plc.alarms import (Alarm, AlarmState, AlarmTransition, Condition, Priority, acknowledge,
                        update)

N, UA, AA, RTN = (AlarmState.NORMAL, AlarmState.UNACK_ACTIVE, AlarmState.ACK_ACTIVE,
                  AlarmState.UNACK_RTN)


def cond(active: bool, aid: str = "zone.pump.over_temp", message: str = "hot") -> Condition:
    return Condition(aid, active, message, Priority.HIGH, trip=True)


def alarm_in(state: AlarmState, aid: str = "zone.pump.over_temp") -> Alarm:
    active = state in (UA, AA)
    return Alarm(aid, state, "hot", Priority.HIGH, True,
                 active_since_s=1.0 if state in (UA, AA, RTN) else None, changed_s=1.0,
                 acked_by="ann" if state is AA else "")


def apply(alarms: dict, event: str, now: float = 5.0):
    if event == "ack":
        return acknowledge(alarms, "zone.pump.over_temp", "bob", now)
    return update(alarms, [cond(event == "active")], now)


# (state, event) -> new state; None: no transition. The complete diagram (without shelving).
TABLE = [
    (N, "active", UA), (N, "clear", None), (N, "ack", None),
    (UA, "active", None), (UA, "clear", RTN), (UA, "ack", AA),
    (AA, "active", None), (AA, "clear", N), (AA, "ack", None),
    (RTN, "active", UA), (RTN, "clear", None), (RTN, "ack", N),
]


@pytest.mark.parametrize("start, event, new", TABLE)
def test_state_diagram(start, event, new):
    before = {"zone.pump.over_temp": alarm_in(start)}
    after, changes = apply(before, event)
    a = after["zone.pump.over_temp"]
    if new is None:
        assert a == before["zone.pump.over_temp"]       # nothing changed, not even the time
        assert changes == []
        return
    assert a.state is new
    assert a.changed_s == 5.0
    assert changes == [AlarmTransition("zone.pump.over_temp", start, new, 5.0, "hot", Priority.HIGH,
                                       "bob" if event == "ack" else "")]
    # active_since: set on activation, kept while active or unacknowledged, cleared at NORMAL
    expected_since = {UA: 5.0, AA: 1.0, RTN: 1.0, N: None}[new]
    assert a.active_since_s == expected_since
    assert a.acked_by == ("bob" if event == "ack" else "")
    assert a.active is (new in (UA, AA))
    assert a.unacknowledged is (new in (UA, RTN))


def test_inputs_are_not_mutated():
    before = {"zone.pump.over_temp": alarm_in(N)}
    snapshot = dict(before)
    update(before, [cond(True)], 5.0)
    acknowledge(before, None, "bob", 5.0)
    assert before == snapshot


@pytest.mark.parametrize("events, states", [
    # each path starts from nothing; every state is reached through real transitions
    (["active", "ack", "clear"], [UA, AA, N]),
    (["active", "clear", "ack"], [UA, RTN, N]),
    (["active", "clear", "active", "ack", "clear"], [UA, RTN, UA, AA, N]),
    (["clear", "active", "active", "clear", "clear"], [N, UA, UA, RTN, RTN]),
])
def test_paths_from_nothing(events, states):
    alarms: dict = {}
    got = []
    for k, ev in enumerate(events):
        if ev == "ack" and "zone.pump.over_temp" not in alarms:
            pytest.fail("bad table")
        alarms, _ = apply(alarms, ev, float(k))
        got.append(alarms["zone.pump.over_temp"].state)
    assert got == states


def test_first_condition_creates_the_alarm_with_its_attributes():
    alarms, changes = update({}, [Condition("estop", True, "E-stop pressed", Priority.CRITICAL,
                                            True)], 12.5)
    a = alarms["estop"]
    assert (a.state, a.priority, a.trip, a.message, a.active_since_s, a.changed_s) == (
        UA, Priority.CRITICAL, True, "E-stop pressed", 12.5, 12.5)
    assert changes == [AlarmTransition("estop", N, UA, 12.5, "E-stop pressed", Priority.CRITICAL)]


def test_inactive_condition_creates_a_normal_alarm_without_transition():
    alarms, changes = update({}, [cond(False)], 3.0)
    assert alarms["zone.pump.over_temp"].state is N and changes == []


def test_alarms_not_mentioned_keep_their_state():
    alarms = {"a": alarm_in(UA, "a"), "b": alarm_in(RTN, "b")}
    out, changes = update(alarms, [cond(True, "c")], 9.0)
    assert out["a"] == alarms["a"] and out["b"] == alarms["b"]
    assert [c.id for c in changes] == ["c"]


def test_message_follows_an_active_condition_without_a_transition():
    alarms, _ = update({}, [cond(True, message="62.0 degC")], 1.0)
    alarms, changes = update(alarms, [cond(True, message="63.0 degC")], 2.0)
    a = alarms["zone.pump.over_temp"]
    assert a.message == "63.0 degC" and a.changed_s == 1.0 and changes == []


def test_several_conditions_in_one_update_report_each_transition_in_order():
    conds = [cond(True, "x"), cond(False, "y"), cond(True, "z")]
    alarms, changes = update({"y": alarm_in(UA, "y")}, conds, 4.0)
    assert [(c.id, c.old, c.new, c.time_s) for c in changes] == [
        ("x", N, UA, 4.0), ("y", UA, RTN, 4.0), ("z", N, UA, 4.0)]


def test_acknowledge_unknown_id_raises_key_error():
    with pytest.raises(KeyError):
        acknowledge({"a": alarm_in(UA, "a")}, "nope", "bob", 1.0)
    with pytest.raises(KeyError):
        acknowledge({}, "a", "bob", 1.0)


def test_acknowledge_all():
    alarms = {aid: alarm_in(st, aid) for aid, st in
              [("n", N), ("ua", UA), ("aa", AA), ("rtn", RTN), ("ua2", UA)]}
    out, changes = acknowledge(alarms, None, "carol", 7.0)
    assert {k: a.state for k, a in out.items()} == {
        "n": N, "ua": AA, "aa": AA, "rtn": N, "ua2": AA}
    assert [(c.id, c.old, c.new, c.time_s, c.user) for c in changes] == [
        ("ua", UA, AA, 7.0, "carol"), ("rtn", RTN, N, 7.0, "carol"), ("ua2", UA, AA, 7.0, "carol")]
    assert out["ua"].acked_by == "carol" and out["ua"].changed_s == 7.0
    assert out["aa"] == alarms["aa"] and out["n"] == alarms["n"]   # untouched
    assert out["rtn"].active_since_s is None


def test_acknowledge_all_of_nothing():
    assert acknowledge({}, None, "bob", 1.0) == ({}, [])


def test_reactivation_after_acknowledge_clears_acked_by_and_restamps():
    alarms, _ = update({}, [cond(True)], 1.0)
    alarms, _ = acknowledge(alarms, "zone.pump.over_temp", "bob", 2.0)
    alarms, _ = update(alarms, [cond(False)], 3.0)
    alarms, changes = update(alarms, [cond(True)], 4.0)
    a = alarms["zone.pump.over_temp"]
    assert (a.state, a.acked_by, a.active_since_s, a.changed_s) == (UA, "", 4.0, 4.0)
    assert changes[0].old is N
