"""plc.sequencer driven through plc.scan: every transition and guard, in virtual time.

There is no plant: the ``rig`` fixture (conftest) scans hand-made input images and the test
sets the zone temperatures directly. Times are checked to within a scan or two, since the delays
are sums of ``dt``. The transitions and dwells are tested with step goals (the rig's ``program``
has the goal ramps set to 0); the ramps, their soft landing and the feed-forward rate have their
own tests at the end, on the machine's own program.
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import MappingProxyType

import pytest

from plc.commands import (Abort, Acknowledge, Command, Hold, Reset, Resume, SetManual, SetTrim,
                          StartRecipe, Stop)
from plc.alarms import Alarm
from plc.image import bad
from plc.contract import OUTPUT_SPECS, TANK_ZONES, ZONES
from plc.program import Program
from plc.sequencer import check_command, goal_rate_k_per_s, setpoints
from plc.state import Phase, PlcState

HEATERS = tuple(f"heater_{z}" for z in ZONES)


@pytest.fixture(scope="module")
def machine_program() -> Program:
    """The machine's own program, goal ramps included."""
    from conftest import MACHINE_FILE
    from plc.config import load_all
    return Program.from_config(*load_all(MACHINE_FILE))



ALL_OFF = {n: False for n in OUTPUT_SPECS}
SLACK = 0.25  # s: delays are sums of dt; allow a scan or two


def with_recipe(p: Program, rid: str, **changes) -> Program:
    return replace(p, recipes=MappingProxyType({**p.recipes, rid: replace(p.recipes[rid], **changes)}))


def outs(r) -> dict[str, bool]:
    return {n: bool(pt.value) for n, pt in r.outputs.items()}


def start(rig_, recipe="dark-70"):
    return rig_.scan(StartRecipe(recipe, user="op"))


def to_cooling(r) -> None:
    g = r.p.recipes[r.state.recipe_id]
    r.set_all(g.heating_goal_c)
    r.run(200, until=lambda x: x.state.phase is Phase.COOLING)
    assert r.state.phase is Phase.COOLING


def to_pouring(r) -> None:
    g = r.p.recipes[r.state.recipe_id]
    pump_c = max(g.cooling_goal_c, r.p.sequence.pump_min_c + 0.5)   # keep the pump allowed
    r.set(tank_bottom=g.cooling_goal_c, tank_wall=g.cooling_goal_c, pump=pump_c, fountain=pump_c)
    r.run(200, until=lambda x: x.state.phase is Phase.POURING)
    assert r.state.phase is Phase.POURING


def to_released(r) -> None:
    r.set_all(r.p.recipes[r.state.recipe_id].pouring_goal_c)
    r.run(200, until=lambda x: x.state.pouring_released)
    assert r.state.pouring_released


def event_time(r, kind, **data) -> float:
    for e in r.events:
        if e.kind == kind and all(e.get(k) == v for k, v in data.items()):
            return e.time_s
    raise AssertionError(f"no {kind} event with {data}")


def refused(result) -> list[tuple[str, str]]:
    return [(e.get("command"), e.get("reason")) for e in result.events
            if e.kind == "command_refused"]


# --- start ------------------------------------------------------------------------------------

def test_start_from_idle(rig):
    r = rig()
    res = start(r)
    assert r.state.phase is Phase.HEATING
    assert (r.state.recipe_id, r.state.batch_id, r.state.batch_seq) == (
        "dark-70", "tempering-01-000001", 1)
    assert [e.kind for e in res.events][:3] == ["command_accepted", "phase", "batch_start"]
    bs = r.kinds("batch_start")[0]
    assert (bs.get("batch_id"), bs.get("recipe_id"), bs.get("user")) == (
        "tempering-01-000001", "dark-70", "op")
    assert res.demands.control and res.demands.mixer
    assert outs(res)["mixer"]


def test_start_again_from_stopped(rig):
    r = rig()
    start(r)
    r.run(1)
    r.scan(Abort(user="op"))
    assert r.state.phase is Phase.STOPPED
    start(r, "milk-35")
    assert r.state.phase is Phase.HEATING
    assert (r.state.recipe_id, r.state.batch_id) == ("milk-35", "tempering-01-000002")


@pytest.mark.parametrize("setup, recipe, reason", [
    ("running", "dark-70", "a batch is heating; stop or abort it first"),
    ("trip", "dark-70", "a trip is latched (first-out: estop); reset first"),
    ("idle", "nope", "unknown recipe 'nope' (known: dark-70, milk-35, white-28)"),
])
def test_start_refused(rig, setup, recipe, reason):
    r = rig()
    if setup == "running":
        start(r)
    elif setup == "trip":
        r.overrides["estop_ok"] = False
        r.scan()
        r.overrides.clear()
        r.scan()
    before = r.state
    res = r.scan(StartRecipe(recipe, user="op"))
    assert refused(res) == [("StartRecipe", reason)]
    assert r.state.phase is before.phase and r.state.batch_seq == before.batch_seq
    assert not r.kinds("batch_start")[1 if setup == "running" else 0:]


# --- heating ----------------------------------------------------------------------------------

def test_heating_to_cooling_after_heating_delay(rig, program):
    r = rig()
    r.set_all(48.0)
    start(r)
    r.run(120, until=lambda x: x.state.phase is Phase.COOLING)
    t = event_time(r, "phase", to="cooling")
    assert abs(t - program.sequence.heating_dwell_s) <= SLACK


@pytest.mark.parametrize("zone", ZONES)
def test_heating_waits_for_every_zone(rig, program, zone):
    r = rig()
    r.set_all(48.0).set(**{zone: 47.6})           # 0.4 K off: outside the 0.3 K tolerance
    start(r)
    r.run(150)
    assert r.state.phase is Phase.HEATING and r.state.dwell_s == 0.0
    r.set(**{zone: 47.8})
    t0 = r.now_s
    r.run(120, until=lambda x: x.state.phase is Phase.COOLING)
    assert abs(event_time(r, "phase", to="cooling") - t0 - program.sequence.heating_dwell_s) <= SLACK


def test_heating_dwell_restarts_when_a_zone_leaves_the_goal(rig, program):
    r = rig()
    r.set_all(48.0)
    start(r)
    r.run(30)
    r.set(tank_wall=48.5)
    r.scan()
    assert r.state.dwell_s == 0.0
    r.set(tank_wall=48.0)
    t0 = r.now_s
    r.run(120, until=lambda x: x.state.phase is Phase.COOLING)
    assert abs(event_time(r, "phase", to="cooling") - t0 - program.sequence.heating_dwell_s) <= SLACK


def test_mixer_runs_mixer_delay_before_any_heater(rig, program):
    r = rig()
    start(r)                                     # everything at 20 degC: the loops want heat
    delay = program.sequence.mixer_delay_s
    early = r.run(delay - 0.2)
    for res in [r.last] + early:
        o = outs(res)
        assert o["mixer"]
        assert not any(o[h] for h in HEATERS)
        assert not o["cool1_tank"] and not o["cool2_tank"]
        assert not res.demands.heaters_enabled
    later = r.run(30)
    enabled_at = next(k for k, res in enumerate(later) if res.demands.heaters_enabled)
    assert enabled_at * r.dt <= 0.3
    assert any(outs(res)["heater_tank_bottom"] for res in later)
    assert all(res.demands.heaters_enabled for res in later[enabled_at:])


def test_without_mixer_heaters_are_enabled_at_once(rig, program):
    r = rig(with_recipe(program, "dark-70", mixer=False))
    res = start(r)
    assert res.demands.heaters_enabled and not outs(res)["mixer"]


# --- pump -------------------------------------------------------------------------------------

def test_pump_start_and_stop_rules(rig, program):
    seq = program.sequence
    assert (seq.pump_min_c, seq.pump_start_c) == (26.0, 28.0)
    r = rig()                                    # tanks stay cold: heating never completes
    r.set(pump=seq.pump_start_c - 0.1)
    start(r)
    assert not any(outs(x)["pump"] for x in r.run(100))      # below the start temperature

    r.set(pump=seq.pump_start_c)
    t0 = r.now_s
    res = r.run(100, until=lambda x: outs(x)["pump"])
    on_after = r.now_s - r.dt - t0
    assert outs(res[-1])["pump"] and abs(on_after - seq.pump_delay_s) <= SLACK

    r.set(pump=seq.pump_min_c + 0.5)             # between min and start: keeps running
    assert all(outs(x)["pump"] for x in r.run(30))

    r.set(pump=seq.pump_min_c - 0.1)             # below the minimum: stops in this very scan
    assert not outs(r.scan())["pump"]

    r.set(pump=seq.pump_min_c + 1.0)             # back between: needs the start temperature again
    assert not any(outs(x)["pump"] for x in r.run(100))
    r.set(pump=seq.pump_start_c + 0.5)
    t0 = r.now_s
    r.run(100, until=lambda x: outs(x)["pump"])
    assert abs(r.now_s - r.dt - t0 - seq.pump_delay_s) <= SLACK


def test_pump_warm_up_restarts_if_it_dips(rig, program):
    seq = program.sequence
    r = rig()
    r.set(pump=30.0)
    start(r)
    r.run(50)
    r.set(pump=27.0)                             # dip below the start temperature before ready
    r.scan()
    r.set(pump=30.0)
    t0 = r.now_s
    assert not any(outs(x)["pump"] for x in r.run(seq.pump_delay_s - 1.0))
    r.run(10, until=lambda x: outs(x)["pump"])
    assert abs(r.now_s - r.dt - t0 - seq.pump_delay_s) <= SLACK


# --- cooling and pouring ----------------------------------------------------------------------

def test_cooling_to_pouring_on_tank_zones_sets_tempered(rig, program):
    r = rig()
    start(r)
    to_cooling(r)
    assert not r.state.tempered
    # only the tank zones decide: pump and fountain stay warmer
    r.set(tank_bottom=27.5, tank_wall=27.8, pump=30.0, fountain=33.0)
    r.run(150)
    assert r.state.phase is Phase.COOLING                     # tank_wall 0.3 K off: not at goal
    r.set(tank_wall=27.5)
    t0 = r.now_s
    r.run(120, until=lambda x: x.state.phase is Phase.POURING)
    assert r.state.phase is Phase.POURING and r.state.tempered
    assert abs(event_time(r, "phase", to="pouring") - t0 - program.sequence.cooling_dwell_s) <= SLACK
    assert "tempered" in [e for e in r.kinds("phase") if e.get("to") == "pouring"][0].message


def test_pouring_released_after_pouring_delay(rig, program):
    r = rig()
    start(r)
    to_cooling(r)
    to_pouring(r)
    r.set_all(31.5)
    t0 = r.now_s
    before = r.run(120, until=lambda x: x.state.pouring_released)
    assert abs(event_time(r, "pouring_released") - t0 - program.sequence.pouring_dwell_s) <= SLACK
    assert not any(outs(x)["vibration"] for x in before[:-1])      # vibration only when pouring
    assert all(outs(x)["pump"] for x in before)                    # dark: the fountain runs
    assert all(outs(x)["vibration"] for x in r.run(10))


@pytest.fixture(scope="module")
def white_released(rig, program):
    """White 28 (no fountain, pedal auto 2 s on / 3 s off, mold and table heaters) released."""
    p = program
    r = rig(p)
    start(r, "white-28")
    to_cooling(r)
    to_pouring(r)
    to_released(r)
    return p, r.state, r.now_s, r.tick, dict(r.temps)


def resume_rig(rig, fixture, p=None):
    p0, state, now, tick, temps = fixture
    return rig(p or p0, state=state, now_s=now, tick=tick, temps=temps)


def runs(values: list[bool]) -> list[tuple[bool, int]]:
    out: list[tuple[bool, int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def test_pedal_auto_timing(rig, white_released):
    r = resume_rig(rig, white_released)
    recipe = r.p.recipes["white-28"]
    assert recipe.pedal_auto and not recipe.fountain
    pattern = runs([outs(x)["pump"] for x in r.run(30)])
    on_n, off_n = round(recipe.pedal_on_s / r.dt), round(recipe.pedal_off_s / r.dt)
    # the cycle started at release; we join it after the release scan, so the first run is short
    assert pattern[0][0] is True and pattern[0][1] <= on_n
    for value, n in pattern[1:-1]:
        assert abs(n - (on_n if value else off_n)) <= 1, pattern
    assert len(pattern) >= 10


def test_manual_pedal_follows_the_input(rig, program):
    p = with_recipe(program, "white-28", pedal_auto=False)
    r = rig(p)
    start(r, "white-28")
    to_cooling(r)
    to_pouring(r)
    r.overrides["pedal"] = True
    r.set_all(28.5)
    before = r.run(120, until=lambda x: x.state.pouring_released)
    assert not any(outs(x)["pump"] for x in before[:-1])   # not before pouring is released
    for pedal, pump in [(True, True), (False, False), (True, True), (bad("gone", value=False), False),
                        (True, True)]:
        r.overrides["pedal"] = pedal
        assert outs(r.scan())["pump"] is pump                 # in the same scan
        assert all(outs(x)["pump"] is pump for x in r.run(1))


def test_deviation_error_withholds_pouring(rig, white_released):
    r = resume_rig(rig, white_released)
    r.overrides["pedal"] = False
    assert outs(r.scan())["vibration"]
    r.set(fountain=28.5 - 3.5)
    res = r.run(5)
    assert r.state.alarms["zone.fountain.deviation_error"].active
    assert not outs(res[-1])["vibration"]
    assert not any(outs(x)["pump"] for x in res[-10:])
    r.set(fountain=28.5)
    r.run(1)
    assert outs(r.last)["vibration"]


# --- hold / resume ----------------------------------------------------------------------------

def test_hold_stops_timers_and_resume_continues(rig, program):
    r = rig()
    r.set_all(48.0)
    start(r)
    r.run(30)
    dwell, phase_t = r.state.dwell_s, r.state.phase_time_s
    res = r.scan(Hold(user="op"))
    assert r.state.held
    held = [res] + r.run(200)
    assert r.state.phase is Phase.HEATING
    assert (r.state.dwell_s, r.state.phase_time_s) == (dwell, phase_t)
    assert all(x.demands.control for x in held)                # temperatures are still held
    assert refused(r.scan(Hold(user="op"))) == [("Hold", "already held")]
    r.scan(Resume(user="op"))
    assert not r.state.held
    r.run(120, until=lambda x: x.state.phase is Phase.COOLING)
    resumed_at = event_time(r, "command_accepted", command="Resume")
    remaining = program.sequence.heating_dwell_s - dwell
    assert abs(event_time(r, "phase", to="cooling") - resumed_at - remaining) <= SLACK


def test_hold_withholds_pouring(rig, white_released):
    r = resume_rig(rig, white_released)
    o = outs(r.scan())
    assert o["pump"] and o["vibration"] and o["mold_heater"] and o["vib_heater"]
    res = r.scan(Hold(user="op"))
    held = [res] + r.run(10)
    for x in held:
        o = outs(x)
        assert not o["pump"] and not o["vibration"]
        assert o["mold_heater"] and o["vib_heater"] and o["mixer"]
    r.scan(Resume(user="op"))
    assert any(outs(x)["pump"] for x in r.run(6)) and outs(r.last)["vibration"]


@pytest.mark.parametrize("cmd, reason", [
    (Hold(), "nothing to hold in phase idle"),
    (Resume(), "nothing to resume (not held or interrupted)"),
    (Stop(), "stop ends pouring; in phase idle use abort"),
    (Abort(), "no running batch to abort (phase idle)"),
    (Reset(), "no trip is latched"),
    (Acknowledge("nope"), "unknown alarm 'nope'"),
    (SetManual("attic", 10.0), "unknown zone 'attic'"),
    (SetManual("pump", 100.5), "output must be within -100..100 % (got 100.5)"),
    (SetManual("pump", -101.0), "output must be within -100..100 % (got -101.0)"),
    (SetManual("pump", math.nan), "output must be within -100..100 % (got nan)"),
    (SetTrim("pump", 2.01), "trim must be within -2.0..2.0 K (got 2.01)"),
    (SetTrim("pump", -3.0), "trim must be within -2.0..2.0 K (got -3.0)"),
    (SetTrim("pump", math.nan), "trim must be within -2.0..2.0 K (got nan)"),
    (SetTrim("attic", 1.0), "unknown zone 'attic'"),
    (StartRecipe("nope"), "unknown recipe 'nope' (known: dark-70, milk-35, white-28)"),
    (Command(), "unknown command Command"),
])
def test_refused_commands_report_a_reason_and_change_nothing(rig, cmd, reason):
    r = rig()
    r.scan()
    before = r.state
    res = r.scan(replace(cmd, user="eve"))
    assert refused(res) == [(cmd.name, reason)]
    ev = [e for e in res.events if e.kind == "command_refused"][0]
    assert ev.get("user") == "eve" and reason in ev.message
    assert (r.state.phase, r.state.manual, r.state.trims, r.state.trips) == (
        before.phase, before.manual, before.trims, before.trips)


@pytest.mark.parametrize("cmd, manual, trims", [
    (SetManual("pump", 100.0), {"pump": 100.0}, {}),
    (SetManual("pump", -100.0), {"pump": -100.0}, {}),
    (SetManual("fountain", 0.0), {"fountain": 0.0}, {}),
    (SetTrim("pump", 2.0), {}, {"pump": 2.0}),
    (SetTrim("tank_wall", -2.0), {}, {"tank_wall": -2.0}),
])
def test_set_manual_and_trim_accepted(rig, cmd, manual, trims):
    r = rig()
    res = r.scan(cmd)
    assert [e.kind for e in res.events] == ["command_accepted"]
    assert (dict(r.state.manual), dict(r.state.trims)) == (manual, trims)


def test_set_manual_none_returns_to_auto(rig):
    r = rig()
    r.scan(SetManual("pump", 40.0))
    r.scan(SetManual("pump", None))
    assert dict(r.state.manual) == {}


def test_manual_output_drives_the_zone_while_running(rig, program):
    r = rig(with_recipe(program, "dark-70", mixer=False))
    r.set_all(48.0)
    start(r)
    r.scan(SetManual("pump", 100.0))
    r.run(1)                                     # the PWM takes the new duty at its next window
    assert all(outs(x)["heater_pump"] for x in r.run(3))
    assert all(v.output_pct == 100.0 for x in r.run(1) for v in x.zones if v.name == "pump")


# --- abort / stop -----------------------------------------------------------------------------

def test_abort_goes_to_stopped_with_outputs_off(rig):
    r = rig()
    start(r)
    to_cooling(r)
    assert outs(r.last)["mixer"]
    res = r.scan(Abort(user="op"))
    assert r.state.phase is Phase.STOPPED
    assert outs(res) == ALL_OFF
    assert all(outs(x) == ALL_OFF for x in r.run(20))
    end = r.kinds("batch_end")
    assert len(end) == 1 and end[0].get("outcome") == "aborted"


def test_stop_only_in_pouring(rig):
    r = rig()
    start(r)
    assert refused(r.scan(Stop(user="op"))) == [("Stop", "stop ends pouring; in phase heating use abort")]
    to_cooling(r)
    assert refused(r.scan(Stop())) == [("Stop", "stop ends pouring; in phase cooling use abort")]
    to_pouring(r)
    res = r.scan(Stop(user="op"))
    assert r.state.phase is Phase.STOPPED and outs(res) == ALL_OFF
    assert [e.get("outcome") for e in r.kinds("batch_end")] == ["completed"]


# --- trips ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def everything_on(rig, program):
    """White 28 (pedal on for 1000 s, so the pump stays on) released, every zone in manual
    (tank bottom cooling, the others heating): every output but the tank bottom heater is on."""
    p = with_recipe(program, "white-28", pedal_on_s=1000.0)
    r = rig(p)
    start(r, "white-28")
    to_cooling(r)
    to_pouring(r)
    to_released(r)
    r.scan(SetManual("tank_bottom", -100.0), *(SetManual(z, 100.0) for z in ZONES[1:]))
    r.run(1)
    o = outs(r.last)
    assert o == {**{n: True for n in OUTPUT_SPECS}, "heater_tank_bottom": False}
    return p, r.state, r.now_s, r.tick, dict(r.temps)


IMMEDIATE_TRIPS = [
    ({"estop_ok": False}, "", "estop"),
    ({"estop_ok": bad("timeout", value=False)}, "", "estop"),
    ({"temp_pump": bad("timeout")}, "", "zone.pump.sensor"),
    ({"temp_fountain": math.nan}, "", "zone.fountain.sensor"),
    ({"temp_tank_wall": 80.0}, "", "zone.tank_wall.sensor"),
    ({"temp_tank_bottom": 61.0}, "", "zone.tank_bottom.over_temp"),
    ({"temp_tank_wall": 9.0}, "", "zone.tank_wall.under_temp"),
    ({"current_pump": bad("crc")}, "", "motor.pump.over_current"),
    ({"grid_v_l1": 0.0}, "", "grid.phase_loss"),
    ({"grid_freq": bad("timeout")}, "", "grid.voltage"),
    ({}, "5 consecutive overruns", "plc.watchdog"),
]
DELAYED_TRIPS = [
    ({"current_mixer": 5.0}, "", "motor.mixer.over_current"),
    ({"current_vibration": 3.0}, "", "motor.vibration.over_current"),
    ({"current_total": 25.0}, "", "grid.current"),
    ({"grid_freq": 52.0}, "", "grid.frequency"),
    ({"grid_v_l2": 250.0}, "", "grid.voltage"),
]


@pytest.mark.parametrize("overrides, watchdog, cid", IMMEDIATE_TRIPS + DELAYED_TRIPS)
def test_trip_drives_every_output_off_in_the_same_scan(rig, everything_on, overrides, watchdog, cid):
    r = resume_rig(rig, everything_on)
    batch = r.state.batch_id
    r.overrides.update(overrides)
    results = []
    for _ in range(50):
        results.append(r.scan(watchdog=watchdog))
        if r.state.trips:
            break
    trip_scan = results[-1]
    delayed = (overrides, watchdog, cid) in DELAYED_TRIPS
    assert (len(results) > 1) is delayed
    for x in results[:-1]:                                 # still running before the trip
        assert outs(x)["pump"] and outs(x)["heater_fountain"]
    assert outs(trip_scan) == ALL_OFF
    assert r.state.phase is Phase.FAULT
    assert r.state.first_out == cid and cid in r.state.trips
    trip_ev = [e for e in trip_scan.events if e.kind == "trip"]
    assert trip_ev[0].get("alarm_id") == cid and trip_ev[0].get("first_out") is True
    assert trip_ev[0].get("batch_id") == batch
    end = [e for e in trip_scan.events if e.kind == "batch_end"]
    assert len(end) == 1 and end[0].get("outcome") == f"fault: {cid}"
    assert end[0].get("batch_id") == batch
    assert any(e.kind == "phase" and e.get("to") == "fault" for e in trip_scan.events)
    assert all(outs(x) == ALL_OFF for x in r.run(5))


def test_first_out_is_the_first_trip(rig, everything_on):
    r = resume_rig(rig, everything_on)
    r.overrides["current_pump"] = bad("crc")
    r.scan()
    r.run(1)
    r.set(tank_bottom=61.0)
    r.overrides["estop_ok"] = False
    r.scan()
    assert r.state.first_out == "motor.pump.over_current"
    assert r.state.trips >= {"motor.pump.over_current", "zone.tank_bottom.over_temp", "estop"}
    later = [e for e in r.kinds("trip") if e.get("alarm_id") != "motor.pump.over_current"]
    assert later and all(e.get("first_out") is False for e in later)
    assert len(r.kinds("batch_end")) == 1


def test_simultaneous_trips_first_out_follows_evaluation_order(rig, everything_on):
    r = resume_rig(rig, everything_on)
    r.overrides.update(estop_ok=False, temp_pump=bad("x"))
    r.scan()
    assert r.state.first_out == "estop"
    assert r.state.trips == {"estop", "zone.pump.sensor"}


def test_reset_refused_while_active_then_idle_without_restart(rig, everything_on):
    r = resume_rig(rig, everything_on)
    r.overrides["estop_ok"] = False
    r.scan()
    assert r.state.phase is Phase.FAULT
    res = r.scan(Reset(user="op"))
    assert refused(res) == [("Reset", "conditions still active: estop")]
    assert r.state.trips == {"estop"} and r.state.phase is Phase.FAULT
    res = r.scan(StartRecipe("white-28", user="op"))
    assert refused(res) == [("StartRecipe", "a trip is latched (first-out: estop); reset first")]

    r.overrides.clear()
    r.scan()                                                 # the condition returns to normal
    res = r.scan(Reset(user="op"))
    assert [e.kind for e in res.events][:2] == ["command_accepted", "phase"]
    assert r.state.phase is Phase.IDLE
    assert r.state.trips == frozenset() and r.state.first_out is None
    assert outs(res) == ALL_OFF
    for x in r.run(60):                  # manual outputs are still set: nothing may restart
        assert outs(x) == ALL_OFF and not x.demands.control
    assert r.state.phase is Phase.IDLE
    assert not r.kinds("batch_start")


def test_trip_while_idle_goes_to_fault_without_batch_end(rig):
    r = rig()
    r.overrides["estop_ok"] = False
    res = r.scan()
    assert r.state.phase is Phase.FAULT and outs(res) == ALL_OFF
    assert not r.kinds("batch_end")


# --- working maximum --------------------------------------------------------------------------

@pytest.mark.parametrize("phase, tempered, recipe_changes, trims, expected", [
    (Phase.HEATING, False, {}, {}, {z: 48.0 for z in ZONES}),
    (Phase.HEATING, False, {}, {"pump": 2.0, "fountain": -2.0},
     {"tank_bottom": 48.0, "tank_wall": 48.0, "pump": 50.0, "fountain": 46.0}),
    (Phase.HEATING, False, {"heating_goal_c": 49.0}, {"tank_wall": 2.0, "fountain": 2.0},
     {"tank_bottom": 49.0, "tank_wall": 50.0, "pump": 49.0, "fountain": 51.0}),   # tank_max 50
    (Phase.COOLING, False, {}, {}, {z: 27.5 for z in ZONES}),
    (Phase.POURING, True, {}, {"pump": 2.0}, {**{z: 31.5 for z in ZONES}, "pump": 33.5}),
    (Phase.POURING, True, {"pouring_goal_c": 34.4}, {}, {z: 34.2 for z in ZONES}),
    (Phase.POURING, True, {}, {z: 2.0 for z in ZONES}, {z: 33.5 for z in ZONES}),
    (Phase.POURING, True, {"working_max_c": 33.0}, {"pump": 2.0},
     {**{z: 31.5 for z in ZONES}, "pump": 32.7}),
    (Phase.IDLE, False, {}, {}, {z: None for z in ZONES}),
    (Phase.FAULT, True, {}, {}, {z: None for z in ZONES}),
])
def test_setpoints_table(program, phase, tempered, recipe_changes, trims, expected):
    p = with_recipe(program, "dark-70", **recipe_changes)
    s = PlcState(phase=phase, recipe_id="dark-70", tempered=tempered, trims=trims)
    got = setpoints(p, s)
    assert got.keys() == expected.keys()
    for z, sp in expected.items():
        assert got[z] is None if sp is None else got[z] == pytest.approx(sp), z


def test_setpoint_capped_below_working_max_in_the_scan(rig, program):
    p = with_recipe(program, "dark-70", pouring_goal_c=34.4)
    r = rig(p)
    start(r)
    to_cooling(r)
    to_pouring(r)
    assert r.state.tempered
    r.scan(SetTrim("fountain", 2.0))
    sp = {v.name: v.sp_c for v in r.scan().zones}
    assert sp == pytest.approx({z: 34.5 - p.sequence.tolerance_k for z in ZONES})


def test_heater_forced_off_above_working_max_once_tempered(rig, everything_on):
    r = resume_rig(rig, everything_on)
    wm = r.p.recipes["white-28"].working_max_c
    r.set(fountain=wm + 0.1)
    r.run(r.p.pwm_window_ticks * r.dt)
    assert r.state.alarms["zone.fountain.above_working_max"].active
    res = r.run(3)
    assert all(not outs(x)["heater_fountain"] for x in res)      # manual 100 %, yet off
    assert all(outs(x)["heater_pump"] for x in res)              # the others keep heating
    r.set(fountain=wm - 0.5)
    r.run(1)
    assert all(outs(x)["heater_fountain"] for x in r.run(1))


def test_heater_forced_off_above_working_max_in_the_same_scan(rig, everything_on):
    r = resume_rig(rig, everything_on)
    r.run(0.5)                                    # mid-window, heater_fountain on (manual 100 %)
    assert outs(r.last)["heater_fountain"]
    r.set(fountain=r.p.recipes["white-28"].working_max_c + 0.1)
    assert not outs(r.scan())["heater_fountain"]


def test_no_working_max_before_tempered(rig, program):
    r = rig(with_recipe(program, "dark-70", mixer=False))
    r.set_all(48.0)                                              # far above 34.5, heating
    start(r)
    r.scan(SetManual("fountain", 100.0))
    r.run(1)
    assert all(outs(x)["heater_fountain"] for x in r.run(2))
    assert "zone.fountain.above_working_max" not in {
        k for k, a in r.state.alarms.items() if a.active}


# --- check_command on states the scan cannot reach in one step --------------------------------

@pytest.mark.parametrize("state, cmd, reason", [
    (PlcState(phase=Phase.POURING, recipe_id="dark-70", held=True, trips=frozenset({"estop"})),
     Resume(), "a trip is latched; reset first"),
    (PlcState(phase=Phase.POURING, recipe_id="dark-70", interrupted=True), Hold(),
     "the batch is interrupted; resume or abort it"),
    (PlcState(phase=Phase.POURING, recipe_id="dark-70", interrupted=True), Resume(), ""),
    (PlcState(phase=Phase.COOLING, recipe_id="dark-70"), StartRecipe("dark-70"),
     "a batch is cooling; stop or abort it first"),
    (PlcState(phase=Phase.FAULT, trips=frozenset({"estop"}), first_out="estop",
              alarms={"estop": Alarm("estop", acked=False)}), Reset(), ""),
    # shelved or out of service: Reset sees the raw condition
    (PlcState(phase=Phase.FAULT, trips=frozenset({"estop"}), first_out="estop",
              alarms={"estop": Alarm("estop", active=True, enabled=False)}), Reset(),
     "conditions still active: estop"),
    # restored after a restart: the condition has not been evaluated yet, so not known clear
    (PlcState(phase=Phase.FAULT, trips=frozenset({"estop"}), first_out="estop"), Reset(),
     "conditions still active: estop"),
    (PlcState(phase=Phase.FAULT, trips=frozenset({"estop"}), first_out="estop", restarted=True,
              alarms={"estop": Alarm("estop")}), Reset(), "conditions still active: estop"),
    (PlcState(phase=Phase.STOPPED), StartRecipe("white-28"), ""),
    (PlcState(phase=Phase.STOPPED), Abort(), "no running batch to abort (phase stopped)"),
])
def test_check_command_table(program, state, cmd, reason):
    assert check_command(program, state, cmd) == reason


def test_tank_zones_are_the_cooling_deciders():
    assert TANK_ZONES == ("tank_bottom", "tank_wall")


def test_set_tuning_changes_the_gains_bumplessly_is_checked_and_persists(rig, program):
    from plc.commands import SetTuning, StartRecipe
    from plc.state import restored

    r = rig(temps={"tank_bottom": 40.0})
    r.scan(StartRecipe("dark-70", user="op"))
    r.run(20.0)
    res = r.scan(SetTuning("pump", kp=0.0, ki=0.0, user="tech"))
    assert [e.kind for e in res.events][:1] == ["command_accepted"]
    assert r.state.tuning == {"pump": {"kp": 0.0, "ki": 0.0}}
    pump = [next(z.output_pct for z in x.zones if z.name == "pump") for x in r.run(2.0)]
    # P and I gains zero: the output holds the integral it had (bumpless), whatever the error
    assert max(pump) - min(pump) < 1e-9
    r.scan(SetTuning("pump", kp=80.0, user="tech"))
    assert next(z.output_pct for z in r.scan().zones if z.name == "pump") != pytest.approx(pump[-1])
    r.scan(SetTuning("pump", kp=0.0, user="tech"))
    for bad in (SetTuning("pump", kp=-1.0), SetTuning("pump", kd=float("nan")),
                SetTuning("nowhere", kp=1.0), SetTuning("pump", ki=1e9)):
        ev = r.scan(bad).events
        assert ev[0].kind == "command_refused", bad
    assert r.state.tuning == {"pump": {"kp": 0.0, "ki": 0.0}}
    back = restored(r.state.persistent(), program.recipes, tuple(z.name for z in program.zones))
    assert back.tuning == {"pump": {"kp": 0.0, "ki": 0.0}}


def test_program_with_recipes_replaces_the_book(program):
    from plc.config import Recipe
    r = Recipe(name="Test", heating_goal=45, cooling_goal=27, pouring_goal=30, working_max=32,
               mixer_enabled=True, fountain_enabled=True, mold_heater_enabled=False,
               vibration_enabled=False, vib_heater_enabled=False, pedal="manual",
               pedal_on_time=1, pedal_off_time=1)
    p2 = program.with_recipes({"test": r})
    assert list(p2.recipes) == ["test"] and p2.recipes["test"].pouring_goal_c == 30
    assert list(program.recipes) == ["dark-70", "milk-35", "white-28"]     # the original unchanged


# --------------------------------------------------------------------------- batch numbering


def test_a_controller_with_a_floor_continues_the_records_numbering(program, make_inputs, tmp_path):
    """A restored or migrated machine: a new state file (count 0), the records' history up to
    batch 122. The window's floor makes the next batch 123, and the count is persisted, so the
    PLC keeps it after a restart even before the window tells it again."""
    from plc.persist import StateStore
    from plc.runtime import Controller

    path = tmp_path / "plc-state.json"
    store = StateStore(path, background=False)
    c = Controller(program, store)
    assert c.state.batch_seq == 0
    c.set_batch_floor(122)
    c.set_batch_floor(5)                             # a floor never lowers the count
    c.submit(StartRecipe("dark-70", user="op"))
    c.cycle(make_inputs(), 0.0)
    assert c.state.batch_id == f"{program.machine_id}-000123" and c.state.batch_seq == 123
    c.submit(Abort(user="op"))
    c.cycle(make_inputs(), 0.1)
    store.close()
    again = Controller(program, StateStore(path, background=False))
    again.set_batch_floor(122)                       # the window's floor, below the PLC's own
    again.submit(StartRecipe("dark-70", user="op"))
    again.cycle(make_inputs(), 0.2)
    assert again.state.batch_id == f"{program.machine_id}-000124"


def test_a_floor_below_the_plcs_own_count_changes_nothing(rig):
    from plc.sequencer import with_batch_floor

    s = PlcState(batch_seq=40)
    assert with_batch_floor(s, 12) is s
    assert with_batch_floor(s, 41).batch_seq == 41
    r = rig(state=with_batch_floor(PlcState(batch_seq=3), 122))
    start(r)
    assert r.state.batch_id == "tempering-01-000123"


# --- the phase goals' ramps ---------------------------------------------------------------------

def test_cooling_and_reheat_goals_move_and_land_softly(machine_program):
    p = machine_program
    seq = p.sequence
    assert seq.cooling_ramp_k_per_min > 0 and seq.reheat_ramp_k_per_min > 0
    g = p.recipes["dark-70"]
    cooling = PlcState(phase=Phase.COOLING, recipe_id="dark-70")
    sp = lambda s: setpoints(p, s)["tank_bottom"]  # noqa: E731
    assert sp(cooling) == pytest.approx(g.heating_goal_c)
    assert goal_rate_k_per_s(p, cooling) == pytest.approx(-seq.cooling_ramp_k_per_min / 60)
    one_min = replace(cooling, phase_time_s=60.0)
    assert sp(one_min) == pytest.approx(g.heating_goal_c - seq.cooling_ramp_k_per_min)
    # the landing: continuous, slower and slower, then final (rate 0)
    goals = [sp(replace(cooling, phase_time_s=float(t))) for t in range(0, 3600, 5)]
    assert all(b <= a for a, b in zip(goals, goals[1:]))
    assert goals[-1] == pytest.approx(g.cooling_goal_c)
    assert goal_rate_k_per_s(p, replace(cooling, phase_time_s=3600.0)) == 0.0
    pouring = PlcState(phase=Phase.POURING, recipe_id="dark-70", tempered=True)
    assert sp(pouring) == pytest.approx(g.cooling_goal_c)
    assert goal_rate_k_per_s(p, pouring) == pytest.approx(seq.reheat_ramp_k_per_min / 60)
    # held: the goal stays and no feed-forward is asked
    assert goal_rate_k_per_s(p, replace(pouring, held=True)) == 0.0


def test_the_dwell_waits_for_the_final_goal(machine_program):
    from conftest import Rig
    r = Rig(machine_program)
    start(r)
    to_cooling(r)
    g = r.p.recipes["dark-70"]
    # zones that follow the moving goal exactly are at goal, but the dwell does not run
    for _ in range(300):
        r.set_all(setpoints(r.p, r.state)["tank_bottom"])
        r.run(1)
        assert r.state.dwell_s == 0.0 or goal_rate_k_per_s(r.p, r.state) == 0.0
    assert r.state.phase is Phase.COOLING
    r.set_all(g.cooling_goal_c)
    r.run(2000, until=lambda x: x.state.phase is Phase.POURING)
    assert r.state.phase is Phase.POURING
