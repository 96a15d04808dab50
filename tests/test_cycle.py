"""The PLC against the twin in virtual time: a whole cycle, and faults injected in the twin.

Control quality is measured on the twin's true pouring-point temperature; figures against the
targets live in ``bench/control.py`` — here the assertions are the functional promises.
"""

from __future__ import annotations

import pytest

from opcua_server.config import load
from plc.commands import Abort, Reset, Resume, StartRecipe
from plc.program import Program
from plc.runtime import Controller, run_virtual
from twin import Twin
from twin.inprocess import InProcessTwinIo

HEATERS = ("heater_tank_bottom", "heater_tank_wall", "heater_pump", "heater_fountain")


class Machine:
    """Controller + twin, advanced together in virtual time."""

    def __init__(self, initial_temp_c: float | None = None, solid: bool | None = None, seed: int = 3):
        cfg, book = load()
        self.p = Program.from_config(cfg, book)
        self.twin = Twin(cfg.twin, seed=seed, initial_temp_c=initial_temp_c, solid=solid)
        self.io = InProcessTwinIo(self.twin)
        self.c = Controller(self.p)
        self.t = 0.0
        self.events = []
        self.results = []

    def _on(self, r):
        self.events += r.events
        self.results.append(r)

    def run(self, seconds: float) -> None:
        self.results = []
        self.t = run_virtual(self.c, self.io, self.io.advance, round(seconds / self.p.period_s),
                             self._on, start_s=self.t)

    def run_until(self, pred, limit_s: float) -> float:
        start = self.t
        while self.t - start < limit_s:
            self.run(10.0)
            if pred():
                return self.t - start
        raise AssertionError(f"condition not reached within {limit_s} s "
                             f"(phase {self.c.state.phase.value})")

    def kinds(self, kind):
        return [e for e in self.events if e.kind == kind]


@pytest.fixture(scope="module")
def full_cycle():
    m = Machine()
    m.c.submit(StartRecipe("dark-70", user="test"))
    m.run_until(lambda: m.c.state.pouring_released, 3 * 3600)
    m.run(600.0)
    return m


def test_a_whole_cycle_runs_heating_cooling_pouring(full_cycle):
    m = full_cycle
    phases = [(e.get("from"), e.get("to")) for e in m.kinds("phase")]
    assert phases == [("idle", "heating"), ("heating", "cooling"), ("cooling", "pouring")]
    assert m.c.state.tempered and m.c.state.pouring_released
    assert m.twin.liquid_fraction() == pytest.approx(1.0)
    assert not m.kinds("trip")


def test_pouring_hold_is_within_a_tenth_of_a_degree(full_cycle):
    goal = full_cycle.p.recipes["dark-70"].pouring_goal_c
    m = full_cycle
    errs = []
    for _ in range(300):
        m.run(1.0)
        errs.append(abs(m.twin.pouring_temp_c() - goal))
    assert max(errs) <= 0.1
    # the fountain runs continuously in this recipe
    assert all(r.outputs["pump"].value for r in m.results)


def test_never_above_the_working_maximum_once_tempered(full_cycle):
    wmax = full_cycle.p.recipes["dark-70"].working_max_c
    assert all(v.sp_c is not None and v.sp_c < wmax for v in full_cycle.c.last.zones)
    assert max(full_cycle.twin.true_temp_c(z) for z in Twin.ZONES) < wmax


def _molten(temp_c: float = 45.0) -> Machine:
    m = Machine(initial_temp_c=temp_c, solid=False)
    m.c.submit(StartRecipe("dark-70", user="test"))
    m.run(120.0)
    assert m.c.state.phase.value == "heating"
    return m


def _all_off(r) -> bool:
    return not any(p.value for p in r.outputs.values())


@pytest.mark.parametrize("inject, first_out", [
    (lambda t: t.set_estop(True), "estop"),
    (lambda t: t.set_sensor_fault("pump", "open"), "zone.pump.sensor"),
    (lambda t: t.set_sensor_fault("tank_wall", "short"), "zone.tank_wall.sensor"),
    (lambda t: t.set_motor_overload("mixer", True), "motor.mixer.over_current"),
    (lambda t: t.set_grid(voltage_v=180.0), "grid.voltage"),
    (lambda t: t.set_grid(lost_phase=2), "grid.phase_loss"),
    (lambda t: t.set_grid(frequency_hz=47.0), "grid.frequency"),
])
def test_a_fault_in_the_machine_trips_to_safe_outputs(inject, first_out):
    m = _molten()
    assert any(m.results[-1].outputs[h].value for h in HEATERS) or m.results[-1].outputs["mixer"].value
    inject(m.twin)
    m.run(5.0)
    trips = m.kinds("trip")
    assert trips and trips[0].get("alarm_id") == first_out
    assert m.c.state.first_out == first_out and m.c.state.phase.value == "fault"
    k = next(i for i, r in enumerate(m.results) if any(e.kind == "trip" for e in r.events))
    assert all(_all_off(r) for r in m.results[k:])      # safe in the very scan of the trip
    assert m.kinds("batch_end")[-1].get("outcome") == f"fault: {first_out}"


def test_estop_reset_needs_the_chain_closed_and_never_restarts_heating():
    m = _molten()
    m.twin.set_estop(True)
    m.run(1.0)
    m.c.submit(Reset(user="op"))
    m.run(1.0)
    refused = m.kinds("command_refused")
    assert refused and "estop" in refused[-1].message
    m.twin.set_estop(False)
    m.run(1.0)
    m.c.submit(Reset(user="op"))
    m.run(30.0)
    assert m.c.state.phase.value == "idle" and not m.c.state.trips
    assert all(_all_off(r) for r in m.results)
    m.c.submit(Resume(user="op"))          # nothing to resume after a fault: refused
    m.run(1.0)
    assert "Resume refused" in m.kinds("command_refused")[-1].message
    assert all(_all_off(r) for r in m.results)


def test_a_heater_failure_shows_as_deviation_not_as_silence():
    m = Machine(initial_temp_c=45.0, solid=False)
    m.c.submit(StartRecipe("dark-70", user="test"))
    m.run_until(lambda: m.c.state.pouring_released, 3600)
    for h in HEATERS:
        m.twin.set_heater_failed(h, True)
    m.run_until(lambda: any(a.id.endswith("deviation_warning") and a.active
                            for a in m.c.state.alarms.values()), 3600)
    m.c.submit(Abort(user="op"))
    m.run(1.0)
    assert m.c.state.phase.value == "stopped" and _all_off(m.results[-1])
