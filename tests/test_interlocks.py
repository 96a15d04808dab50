"""plc.interlocks: each condition id of the module docstring, for its cause and not otherwise.

``evaluate`` is driven directly with hand-made input images (healthy inputs from conftest,
with overrides) in virtual time; on-delays are checked by stepping ``dt`` and carrying the
timers, as the scan does.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import MappingProxyType

import pytest

from plc.image import Point, Quality, bad
from plc.interlocks import ZoneReading, evaluate, read_zone
from plc.contract import ZONES

DT = 0.1


def conditions(program, image, *, goals=None, reached=None, working_max=None, watchdog="",
               timers=None, stuck=None, dt=DT, window="", heat=None):
    readings = {z: read_zone(program, image, z) for z in ZONES}
    conds, timers = evaluate(
        program, image, readings, {z: False for z in ZONES} | (stuck or {}),
        goals or {z: None for z in ZONES}, {z: False for z in ZONES} | (reached or {}),
        working_max, watchdog, timers or {}, dt, window, heat)
    assert len(conds) == len({c.id for c in conds})      # each id once
    return {c.id: c for c in conds}, timers


def active_ids(conds) -> set[str]:
    return {i for i, c in conds.items() if c.active}


def first_active(program, make_image, cid, seconds, **kw):
    """Step evaluate for ``seconds``; return the virtual time at which ``cid`` first is active."""
    timers: dict = {}
    for k in range(1, round(seconds / DT) + 1):
        conds, timers = conditions(program, make_image(k * DT), timers=timers, **kw)
        if conds[cid].active:
            return k * DT
    return None


# --- read_zone --------------------------------------------------------------------------------

@pytest.mark.parametrize("point, pv, fault", [
    (Point(31.5), 31.5, ""),
    (Point(70.0), 70.0, ""),                       # at the plausibility limit: still a reading
    (Point(-20.0), -20.0, ""),
    (Point(70.1), None, "open sensor"),
    (Point(850.0), None, "open sensor"),
    (Point(-20.1), None, "shorted sensor"),
    (Point(-50.0), None, "shorted sensor"),
    (Point(math.nan), None, "NaN"),
    (bad("timeout"), None, "input bad: timeout"),
    (bad(""), None, "input bad: no reason given"),
    (Point(31.5, Quality.UNCERTAIN), 31.5, ""),     # uncertain: usable, flagged by io.uncertain
    (None, None, "not provided"),
])
def test_read_zone(program, make_inputs, point, pv, fault):
    image = make_inputs(temp_pump=point)
    r = read_zone(program, image, "pump")
    assert r.pv == pv
    assert (fault in r.fault) and (bool(r.fault) == bool(fault))


# --- healthy ----------------------------------------------------------------------------------

ALL_IDS = {"estop", "plc.watchdog", "plc.window", "io.uncertain", "grid.current", "grid.phase_loss",
           "grid.voltage", "grid.frequency",
           *(f"motor.{m}.over_current" for m in ("mixer", "pump", "vibration")),
           *(f"zone.{z}.{k}" for z in ZONES for k in ("sensor", "over_temp", "under_temp",
                                                      "deviation_warning", "deviation_error",
                                                      "above_working_max", "no_progress"))}


def test_healthy_inputs_raise_nothing_and_every_id_is_reported(program, make_inputs):
    timers: dict = {}
    for _ in range(100):
        conds, timers = conditions(program, make_inputs({z: 31.5 for z in ZONES}),
                                   goals={z: 31.5 for z in ZONES},
                                   reached={z: True for z in ZONES}, working_max=34.5,
                                   timers=timers)
        assert active_ids(conds) == set()
    assert set(conds) == ALL_IDS
    assert timers == {}


def test_trip_flags_follow_the_docstring(program, make_inputs):
    conds, _ = conditions(program, make_inputs())
    trips = {i for i, c in conds.items() if c.trip}
    assert trips == ALL_IDS - {"io.uncertain", "plc.window", *(f"zone.{z}.{k}" for z in ZONES for k in (
        "deviation_warning", "deviation_error", "above_working_max", "no_progress"))}


# --- immediate conditions ---------------------------------------------------------------------

UNC = Quality.UNCERTAIN


@pytest.mark.parametrize("overrides, expected, text", [
    ({"estop_ok": False}, {"estop"}, "chain open"),
    ({"estop_ok": bad("device timeout", value=False)}, {"estop"}, "not good: device timeout"),
    ({"estop_ok": Point(True, UNC)}, {"estop", "io.uncertain"}, "not good"),
    ({"estop_ok": None}, {"estop"}, "not provided"),
    ({"temp_pump": bad("timeout")}, {"zone.pump.sensor"}, "input bad: timeout"),
    ({"temp_pump": math.nan}, {"zone.pump.sensor"}, "NaN"),
    ({"temp_fountain": 75.0}, {"zone.fountain.sensor"}, "open sensor"),
    ({"temp_tank_wall": -30.0}, {"zone.tank_wall.sensor"}, "shorted sensor"),
    ({"temp_tank_bottom": 60.5}, {"zone.tank_bottom.over_temp"}, "over-temperature"),
    ({"temp_tank_bottom": 9.5}, {"zone.tank_bottom.under_temp"}, "under-temperature"),
    ({"temp_pump": Point(31.0, UNC)}, {"io.uncertain"}, "temp_pump"),
    ({"current_mixer": bad("crc")}, {"motor.mixer.over_current"}, "current input bad: crc"),
    ({"current_vibration": None}, {"motor.vibration.over_current"}, "not provided"),
    ({"grid_v_l2": 50.0}, {"grid.phase_loss"}, "grid_v_l2"),
    ({"grid_v_l1": 0.0, "grid_v_l3": 0.0}, {"grid.phase_loss"}, "grid_v_l1, grid_v_l3"),
    ({"grid_freq": bad("timeout")}, {"grid.voltage"}, "grid_freq: input bad"),
    ({"current_total": bad("timeout")}, {"grid.voltage"}, "unavailable"),
    ({"grid_v_l3": None}, {"grid.voltage"}, "grid_v_l3"),
])
def test_immediate_condition(program, make_inputs, overrides, expected, text):
    conds, _ = conditions(program, make_inputs({z: 31.5 for z in ZONES}, **overrides))
    assert active_ids(conds) == expected
    assert any(text in conds[i].message for i in expected)


@pytest.mark.parametrize("temp, expected", [
    (60.0, set()), (60.01, {"over_temp"}), (10.0, set()), (9.99, {"under_temp"}),
    (65.5, {"over_temp"}), (70.01, {"sensor"}), (5.0, {"under_temp"}),
])
def test_temperature_limits_are_inclusive(program, make_inputs, temp, expected):
    conds, _ = conditions(program, make_inputs({"pump": temp}))
    assert active_ids(conds) == {f"zone.pump.{k}" for k in expected}


def test_over_temp_uses_the_lower_of_zone_max_and_abs_max(program, make_inputs):
    zones = tuple(replace(z, max_temp_c=80.0) if z.name == "pump" else z for z in program.zones)
    p = replace(program, zones=zones)                     # abs_max 65 now decides
    assert "zone.pump.over_temp" not in active_ids(conditions(p, make_inputs({"pump": 64.9}))[0])
    assert "zone.pump.over_temp" in active_ids(conditions(p, make_inputs({"pump": 65.1}))[0])


def test_a_faulty_sensor_does_not_also_raise_over_or_under_temperature(program, make_inputs):
    conds, _ = conditions(program, make_inputs({"pump": 75.0}))
    assert active_ids(conds) == {"zone.pump.sensor"}


def test_stuck_sensor(program, make_inputs):
    conds, _ = conditions(program, make_inputs(), stuck={"tank_wall": True})
    assert active_ids(conds) == {"zone.tank_wall.sensor"}
    assert "stuck" in conds["zone.tank_wall.sensor"].message


def test_watchdog(program, make_inputs):
    conds, _ = conditions(program, make_inputs(), watchdog="3 consecutive overruns")
    assert active_ids(conds) == {"plc.watchdog"}
    assert "3 consecutive overruns" in conds["plc.watchdog"].message


def test_plant_window_lost_is_an_alarm_not_a_trip(program, make_inputs):
    """The PLC goes on controlling without its window: an alarm to see, never a trip."""
    conds, _ = conditions(program, make_inputs(), window="plant window silent for 3.2 s (hung?)")
    assert active_ids(conds) == {"plc.window"}
    assert not conds["plc.window"].trip
    assert "plant window silent for 3.2 s" in conds["plc.window"].message


def test_motor_without_limit_is_not_monitored(program, make_inputs):
    p = replace(program, limits=replace(program.limits, motor_current_a=MappingProxyType(
        {**program.limits.motor_current_a, "vibration": 0.0})))
    conds, _ = conditions(p, make_inputs(current_vibration=bad("gone")))
    assert "not monitored" in conds["motor.vibration.over_current"].message
    assert active_ids(conds) == set()


def test_single_phase_machine_monitors_l1_only(program, make_inputs):
    p = replace(program, limits=replace(program.limits, phase_count=1))
    conds, _ = conditions(p, make_inputs(grid_v_l2=0.0, grid_v_l3=None))
    assert active_ids(conds) == set()
    conds, _ = conditions(p, make_inputs(grid_v_l1=0.0))
    assert active_ids(conds) == {"grid.phase_loss"}


# --- delayed conditions -----------------------------------------------------------------------

@pytest.mark.parametrize("overrides, cid", [
    ({"current_mixer": 4.5}, "motor.mixer.over_current"),
    ({"current_pump": 3.5}, "motor.pump.over_current"),
    ({"current_vibration": 9.0}, "motor.vibration.over_current"),
    ({"current_total": 20.5}, "grid.current"),
    ({"grid_v_l1": 190.0}, "grid.voltage"),
    ({"grid_v_l3": 250.0}, "grid.voltage"),
    ({"grid_freq": 48.9}, "grid.frequency"),
    ({"grid_freq": 51.2}, "grid.frequency"),
])
def test_delayed_trip_after_alarm_delay(program, make_inputs, overrides, cid):
    delay = program.limits.alarm_delay_s
    t = first_active(program, lambda _t: make_inputs(**overrides), cid, 10.0)
    assert t is not None and delay - DT / 2 <= t <= delay + DT + 1e-9
    conds, _ = conditions(program, make_inputs(**overrides))
    assert active_ids(conds) == set()        # not in the first scan
    assert conds[cid].trip


@pytest.mark.parametrize("point, limit_of", [
    ("current_mixer", lambda lim: lim.motor_current_a["mixer"]),
    ("current_pump", lambda lim: lim.motor_current_a["pump"]),
    ("current_total", lambda lim: lim.current_total_a),
    ("grid_v_l1", lambda lim: lim.voltage_low_v),
    ("grid_v_l2", lambda lim: lim.voltage_high_v),
    ("grid_freq", lambda lim: lim.frequency_hz - lim.frequency_tol_hz),
    ("grid_freq", lambda lim: lim.frequency_hz + lim.frequency_tol_hz),
])
def test_delayed_conditions_at_their_limit_do_not_trip(program, make_inputs, point, limit_of):
    image = make_inputs(**{point: limit_of(program.limits)})
    timers: dict = {}
    for _ in range(50):
        conds, timers = conditions(program, image, timers=timers)
        assert active_ids(conds) == set()


@pytest.mark.parametrize("inrush_s", [0.5, 1.0, 1.5, 1.8])
def test_motor_inrush_shorter_than_the_delay_does_not_trip(program, make_inputs, inrush_s):
    """Repeated starts: 5x running current for ``inrush_s``, then 2 s running. The timer must
    restart at each start, so no accumulation over several starts trips the motor."""
    def image(t):
        return make_inputs(current_mixer=7.5 if (t % (inrush_s + 2.0)) < inrush_s else 1.5)
    assert first_active(program, image, "motor.mixer.over_current", 30.0) is None


def test_delay_timer_restarts_after_a_gap(program, make_inputs):
    timers: dict = {}
    for k in range(15):                 # 1.5 s over
        conds, timers = conditions(program, make_inputs(current_total=25.0), timers=timers)
    conds, timers = conditions(program, make_inputs(), timers=timers)         # one good scan
    assert "grid.i" not in timers
    for k in range(15):
        conds, timers = conditions(program, make_inputs(current_total=25.0), timers=timers)
        assert not conds["grid.current"].active


# --- deviation --------------------------------------------------------------------------------

GOALS = {z: 31.5 for z in ZONES}


@pytest.mark.parametrize("pump_c, reached, expected", [
    (32.9, True, set()),                                    # 1.4 K: inside the warning limit
    (33.2, True, {"deviation_warning"}),                    # 1.7 K
    (29.8, True, {"deviation_warning"}),                    # -1.7 K
    (34.8, True, {"deviation_warning", "deviation_error"}),  # 3.3 K
    (28.0, True, {"deviation_warning", "deviation_error"}),
    (34.8, False, set()),                                   # not yet at goal in this phase
])
def test_deviation_alarms_with_on_delay(program, make_inputs, pump_c, reached, expected):
    delay = program.limits.alarm_delay_s
    temps = {**GOALS, "pump": pump_c}
    timers: dict = {}
    seen_at: dict[str, float] = {}
    for k in range(1, 60):
        conds, timers = conditions(program, make_inputs(temps), goals=GOALS,
                                   reached={z: reached for z in ZONES}, timers=timers)
        for i in active_ids(conds):
            seen_at.setdefault(i, k * DT)
    assert set(seen_at) == {f"zone.pump.{k}" for k in expected}
    for t in seen_at.values():
        assert delay - DT / 2 <= t <= delay + DT + 1e-9
    for k in expected:
        assert not conds[f"zone.pump.{k}"].trip
        assert conds[f"zone.pump.{k}"].value == pytest.approx(abs(pump_c - 31.5))


def test_deviation_needs_a_goal(program, make_inputs):
    timers: dict = {}
    for _ in range(50):
        conds, timers = conditions(program, make_inputs({"pump": 40.0}),
                                   reached={z: True for z in ZONES}, timers=timers)
    assert active_ids(conds) == set()


def test_short_deviation_does_not_alarm(program, make_inputs):
    timers: dict = {}
    for k in range(200):
        pump = 35.0 if (k % 20) < 15 else 31.5     # 1.5 s out, 0.5 s back, repeatedly
        conds, timers = conditions(program, make_inputs({**GOALS, "pump": pump}), goals=GOALS,
                                   reached={z: True for z in ZONES}, timers=timers)
        assert active_ids(conds) == set()


# --- working maximum --------------------------------------------------------------------------

@pytest.mark.parametrize("working_max, temp, active", [
    (34.5, 34.6, True), (34.5, 34.5, False), (34.5, 33.0, False), (None, 40.0, False),
])
def test_above_working_max(program, make_inputs, working_max, temp, active):
    conds, _ = conditions(program, make_inputs({"fountain": temp}), working_max=working_max)
    assert active_ids(conds) == ({"zone.fountain.above_working_max"} if active else set())
    if active:
        assert "heater off" in conds["zone.fountain.above_working_max"].message
        assert not conds["zone.fountain.above_working_max"].trip


def test_zone_reading_type_is_used_as_given(program, make_inputs):
    """evaluate trusts the readings it is handed (the scan computes them once)."""
    image = make_inputs()
    readings = {z: ZoneReading(20.0, "") for z in ZONES}
    readings["pump"] = ZoneReading(None, "open sensor (reads 850.0 degC)")
    conds, _ = evaluate(program, image, readings, {z: False for z in ZONES},
                        {z: None for z in ZONES}, {z: False for z in ZONES}, None, "", {}, DT)
    assert {c.id for c in conds if c.active} == {"zone.pump.sensor"}


def test_condition_ids_lists_every_condition_evaluate_raises(program):
    """Every Condition(...) id written in interlocks.py is in condition_ids, and back."""
    import re

    import plc.interlocks as il
    from plc.contract import MOTORS

    ids = il.condition_ids(program)
    assert len(ids) == len(set(ids)) == 1 + 4 * 7 + 3 + 4 + 3
    src = open(il.__file__).read()
    written = set()
    for lit in re.findall(r'Condition\(f?"([^"]+)"', src):
        for z in program.zones:
            for m in MOTORS:
                for cid in ("deviation_warning", "deviation_error"):
                    written.add(lit.replace("{name}", z.name).replace("{m}", m)
                                .replace("{cid}", cid))
    assert written == set(ids)


# --- messages in both directions, values and limits -------------------------------------------

@pytest.mark.parametrize("cid, on, off, text_on, text_off, limit", [
    ("zone.pump.over_temp", {"pump": 61.0}, {"pump": 59.0},
     "Zone pump: over-temperature 61.0 degC > 60 degC",
     "Zone pump: temperature within 60 degC (59.0 degC)", 60.0),
    ("zone.pump.under_temp", {"pump": 9.0}, {"pump": 11.0},
     "Zone pump: under-temperature 9.0 degC < 10 degC",
     "Zone pump: temperature above 10 degC (11.0 degC)", 10.0),
])
def test_temperature_messages_say_what_happened_both_ways(program, make_inputs, cid, on, off,
                                                          text_on, text_off, limit):
    c_on = conditions(program, make_inputs(on))[0][cid]
    c_off = conditions(program, make_inputs(off))[0][cid]
    assert (c_on.active, c_on.message, c_on.value, c_on.limit) == (True, text_on, *on.values(), limit)
    assert (c_off.active, c_off.message, c_off.value, c_off.limit) == (False, text_off, *off.values(), limit)


def test_deviation_back_to_normal_reads_as_such(program, make_inputs):
    timers: dict = {}
    for _ in range(30):
        conds, timers = conditions(program, make_inputs({**GOALS, "pump": 33.2}), goals=GOALS,
                                   reached={z: True for z in ZONES}, timers=timers)
    w = conds["zone.pump.deviation_warning"]
    assert w.active and w.message == ("Zone pump: deviation 1.7 K > 1.5 K from the set-point "
                                      "31.5 degC")
    assert (w.value, w.limit) == (pytest.approx(1.7), 1.5)
    conds, _ = conditions(program, make_inputs({**GOALS, "pump": 31.6}), goals=GOALS,
                          reached={z: True for z in ZONES}, timers=timers)
    w = conds["zone.pump.deviation_warning"]
    assert not w.active and w.message == "Zone pump: deviation back within 1.5 K (0.1 K)"
    assert "back within 3 K" in conds["zone.pump.deviation_error"].message


@pytest.mark.parametrize("overrides, cid, text_on, text_off", [
    ({"estop_ok": False}, "estop", "E-stop pressed (chain open)", "E-stop chain closed"),
    ({"grid_v_l2": 50.0}, "grid.phase_loss", "Phase loss: grid_v_l2 below 99 V",
     "Every phase present (lowest 230 V)"),
])
def test_immediate_messages_both_ways(program, make_inputs, overrides, cid, text_on, text_off):
    assert conditions(program, make_inputs(**overrides))[0][cid].message == text_on
    assert conditions(program, make_inputs())[0][cid].message == text_off


@pytest.mark.parametrize("overrides, cid, value, limit, text_off", [
    ({"current_mixer": 4.5}, "motor.mixer.over_current", 4.5, None, "Motor mixer: current within"),
    ({"current_total": 20.5}, "grid.current", 20.5, 20.0, "Total current within 20 A"),
    ({"grid_v_l1": 190.0}, "grid.voltage", 190.0, 198.0, "Grid voltage within 198-242 V"),
    ({"grid_freq": 51.2}, "grid.frequency", 51.2, 51.0, "Grid frequency within 50+-1 Hz"),
])
def test_delayed_conditions_carry_value_and_limit_and_say_when_back(program, make_inputs,
                                                                    overrides, cid, value,
                                                                    limit, text_off):
    timers: dict = {}
    for _ in range(40):
        conds, timers = conditions(program, make_inputs(**overrides), timers=timers)
    c = conds[cid]
    assert c.active and c.value == value
    assert c.limit == (limit if limit is not None else program.limits.motor_current_a["mixer"])
    conds, _ = conditions(program, make_inputs(), timers=timers)
    assert not conds[cid].active and conds[cid].message.startswith(text_off)


# --- suppressed by design ---------------------------------------------------------------------

def test_a_faulty_sensor_suppresses_the_zone_temperature_alarms(program, make_inputs):
    conds, _ = conditions(program, make_inputs({"pump": 75.0}), goals=GOALS,
                          reached={z: True for z in ZONES}, working_max=34.5,
                          heat={"pump": 100.0})
    suppressed = {i for i, c in conds.items() if c.suppressed}
    assert suppressed == {f"zone.pump.{k}" for k in ("over_temp", "under_temp", "deviation_warning",
                                                     "deviation_error", "above_working_max",
                                                     "no_progress")}
    assert not conds["zone.pump.sensor"].suppressed and conds["zone.pump.sensor"].active
    assert "sensor is faulty" in conds["zone.pump.over_temp"].message


def test_deviation_alarms_are_suppressed_without_a_goal(program, make_inputs):
    conds, _ = conditions(program, make_inputs())
    assert all(conds[f"zone.{z}.deviation_{k}"].suppressed for z in ZONES for k in ("warning", "error"))
    assert "no set-point" in conds["zone.pump.deviation_warning"].message
    conds, _ = conditions(program, make_inputs(GOALS), goals=GOALS)
    assert not any(c.suppressed for c in conds.values())


def test_bad_grid_inputs_suppress_what_cannot_be_evaluated(program, make_inputs):
    conds, _ = conditions(program, make_inputs(grid_freq=bad("timeout")))
    assert conds["grid.voltage"].active and not conds["grid.voltage"].suppressed
    assert all(conds[f"grid.{k}"].suppressed and not conds[f"grid.{k}"].active
               for k in ("phase_loss", "frequency", "current"))


# --- no progress: heater or element failure ----------------------------------------------------

def watch(program, make_inputs, temp_at, seconds, heat=100.0, dt=1.0, zone="fountain", **kw):
    """Step evaluate every ``dt`` for ``seconds`` with ``zone`` heated at ``heat`` %; the zone
    reads ``temp_at(t)``. Returns the first time no_progress is active (None) and the last
    conditions."""
    timers: dict = {}
    goals = {z: 45.0 for z in ZONES}
    first = None
    for k in range(1, round(seconds / dt) + 1):
        conds, timers = conditions(program, make_inputs({zone: temp_at(k * dt)}), goals=goals,
                                   timers=timers, dt=dt, heat={zone: heat}, **kw)
        if first is None and conds[f"zone.{zone}.no_progress"].active:
            first = k * dt
    return first, conds


def test_no_progress_fires_on_a_heater_that_does_not_heat(program, make_inputs):
    lim = program.limits
    first, conds = watch(program, make_inputs, lambda t: 25.0 + 0.3 * (t > 60),
                         lim.no_progress_s + 120)
    assert first == pytest.approx(lim.no_progress_s, abs=1.0)
    c = conds["zone.fountain.no_progress"]
    assert not c.trip and c.priority.name == "HIGH" and not c.suppressed
    assert c.value == pytest.approx(0.3) and c.limit == lim.no_progress_k
    assert "heater or element failure" in c.message


def test_no_progress_fires_while_heating_before_the_goal_is_reached(program, make_inputs):
    first, _ = watch(program, make_inputs, lambda t: 30.0, program.limits.no_progress_s + 5,
                     reached={z: False for z in ZONES})
    assert first is not None


@pytest.mark.parametrize("temp_at, heat", [
    (lambda t: 25.0 + t / 800.0, 100.0),              # slow but steady
    (lambda t: 25.0 + (t // 400) * 1.0, 100.0),       # plateaus of 400 s, then 1 K more
    (lambda t: 25.0, 90.0),                           # not at full output
])
def test_no_progress_stays_quiet_while_the_zone_warms_or_is_not_at_full_output(
        program, make_inputs, temp_at, heat):
    first, _ = watch(program, make_inputs, temp_at, 2.5 * program.limits.no_progress_s, heat)
    assert first is None


def test_no_progress_clears_when_the_temperature_rises_again(program, make_inputs):
    lim = program.limits
    t_fix = lim.no_progress_s + 60
    first, conds = watch(program, make_inputs,
                         lambda t: 25.0 if t < t_fix else 25.0 + lim.no_progress_k + 0.2,
                         t_fix + 10)
    assert first is not None and not conds["zone.fountain.no_progress"].active
    assert "heating progresses" in conds["zone.fountain.no_progress"].message


# --- no progress on the twin: a normal batch never raises it, a failed heater does ------------

def twin_batch(fail: str | None, until, limit_s: float):
    """dark-70 from a solid charge on the default twin (virtual time), ``fail``: a heater
    output that gives no heat. Runs until ``until(controller)`` or ``limit_s``; returns the
    controller and every event."""
    from opcua_server.config import load
    from plc.commands import StartRecipe
    from plc.program import Program
    from plc.runtime import Controller, run_virtual
    from twin import Twin
    from twin.inprocess import InProcessTwinIo

    cfg, book = load()
    p = Program.from_config(cfg, book)
    twin = Twin(cfg.twin, seed=3)
    if fail:
        twin.set_heater_failed(fail, True)
    io = InProcessTwinIo(twin)
    c = Controller(p)
    c.submit(StartRecipe("dark-70", user="test"))
    events: list = []
    t = 0.0
    while t < limit_s and not until(c):
        t = run_virtual(c, io, io.advance, 600, lambda r: events.extend(r.events), start_s=t)
    return c, events


def no_progress_events(events):
    return [e for e in events if e.kind == "alarm" and str(e.get("alarm_id")).endswith(".no_progress")]


def test_no_progress_never_fires_on_a_normal_batch_of_the_twin(program):
    """Defaults: the longest watch of a normal batch from a solid charge is ~11.5 min (the
    tank's melt plateau; ~17 min at 199 V, the lowest voltage without a grid alarm), against
    ``no_progress_s`` 25 min."""
    c, events = twin_batch(None, lambda c: c.state.pouring_released, 3 * 3600)
    assert c.state.pouring_released
    assert no_progress_events(events) == []
    assert program.limits.no_progress_s == 1500.0 and program.limits.no_progress_k == 1.5


def test_no_progress_fires_on_a_failed_fountain_heater_of_the_twin(program):
    c, events = twin_batch("heater_fountain",
                           lambda c: c.state.alarms.get("zone.fountain.no_progress", None) is not None
                           and c.state.alarms["zone.fountain.no_progress"].active, 2 * 3600)
    (e,) = no_progress_events(events)
    assert (e.get("alarm_id"), e.get("to")) == ("zone.fountain.no_progress", "unacknowledged_active")
    assert c.state.phase.value == "heating" and not c.state.trips      # an alarm, not a trip
    assert "heater or element failure" in e.get("alarm").message
