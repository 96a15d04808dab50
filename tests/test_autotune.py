"""Autotune: identification, the scan's experiment, and its commands, in virtual time.

1. ``plc.tuning.identify`` recovers the gain, time constant and dead time of known first order
   plus dead time processes within 15 %, from records made by the scan's own experiment
   (``plc.autotune.step``: settle, relay, step) with a sensor that has noise and the 0.1 degC
   quantisation of the machine's.
2. On the twin: the pump zone of a twin whose lags are set to zero is a first-order node with a
   known gain (heater power over its conductances) and time constant (capacity over
   conductance); the autotune recovers both within 15 % and finds next to no dead time. On the
   default twin every zone gets a proposal with sane figures.
3. An autotune aborted half-way leaves the gains as they were and the output continuous; an
   accepted proposal changes the gains without a bump; a refused autotune (wrong state, wrong
   zone, wrong amplitude, nothing to accept) changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from opcua_server.config import load
from plc import autotune as tune_mod
from plc.commands import (AbortAutotune, AcceptTuning, Hold, RejectTuning, StartAutotune,
                          StartRecipe)
from plc.pid import PidState, PidTuning, pid_update, retune
from plc.program import Program
from plc.sequencer import check_command, gains_of
from plc.state import Phase, PlcState
from plc.tuning import IdentificationError, Model, identify, predict, simc
from twin.autotune import Session, TwinAutotuneError, autotune


# --- 1. identification of known processes, through the scan's experiment ------------------------

def experiment_on(k: float, tau: float, theta: float, u0: float = 20.0, seed: int = 1,
                  out_min: float = 0.0, dt: float = 0.1, lag: float = 0.0):
    """Run plc.autotune.step against y = 31.5 + K * lag_tau(u(t - theta) - u0) (and a second
    lag ``lag`` in series), measured with noise and 0.1 degC quantisation, the PID replaced by a
    constant u0 while settling."""
    rng = np.random.default_rng(seed)
    cfg = tune_mod.Settings()
    x = tune_mod.start("z", "test", 0.0, cfg.amplitude_pct)
    state, state2, delay = 0.0, 0.0, [0.0] * int(round(theta / dt))
    t = 0.0
    while True:
        y = 31.5 + k * (state2 if lag else state) + rng.normal(0, 0.02)
        pv = round(y * 10) / 10
        x, u = tune_mod.step(x, cfg, now_s=t, dt_s=dt, sp=31.5, pv=pv, u_pid=u0,
                             out_min=out_min, out_max=100.0, max_temp_c=60.0)
        if isinstance(x, tune_mod.Outcome):
            return x
        u = u0 if u is None else u
        delay.append(u - u0)
        state += dt / tau * (delay.pop(0) - state)
        state2 += dt / lag * (state - state2) if lag else 0.0
        t += dt
        assert t < 4 * 3600, "the experiment never ended"


@pytest.mark.parametrize("k, tau, theta", [
    (0.0125, 25.0, 12.0),      # a pump-like zone
    (0.016, 40.0, 8.0),
    (0.02, 35.0, 10.0),        # a tank zone held against its neighbour
    (0.02, 200.0, 10.0),       # lag-dominant
    (0.05, 250.0, 15.0),       # a heavy tank
])
def test_identification_recovers_known_processes_within_15_percent(k, tau, theta):
    o = experiment_on(k, tau, theta)
    assert o.status == tune_mod.PROPOSED, o.message
    m = o.model
    assert m.gain_k_per_pct == pytest.approx(k, rel=0.15)
    assert m.tau_s == pytest.approx(tau, rel=0.15)
    assert m.dead_s == pytest.approx(theta, rel=0.15)
    # a real dead time: the lag reading does not fit as well, the proposal is SIMC-PI
    assert m.lag_s == 0.0
    g = o.gains
    assert g.kp > 0 and g.ki > 0 and g.kd == 0
    assert 1.3 < o.prediction.ms < 2.0
    assert o.prediction.gain_margin > 2.0


def test_a_lag_is_read_as_a_lag_and_gets_derivative_action():
    # a heater-like lag of 10 s after the node, 2 s of real dead time
    o = experiment_on(0.02, 40.0, 2.0, lag=10.0)
    m = o.model
    assert o.status == tune_mod.PROPOSED, o.message
    assert m.lag_s == pytest.approx(10.0, rel=0.4) and m.lag_dead_s <= 5.0
    assert m.lag_gain_k_per_pct == pytest.approx(0.02, rel=0.15)
    assert m.lag_tau_s == pytest.approx(40.0, rel=0.3)
    g = o.gains
    assert g.kd > 0 and g.kd == pytest.approx(min(1000.0, (g.ki * m.lag_tau_s) * m.lag_s), rel=0.3)
    assert o.prediction.ms < 2.0 and "read as a lag" in o.message


def test_identify_refuses_a_record_without_excitation():
    flat = [(float(t), 20.0, 31.5) for t in range(200)]
    with pytest.raises(IdentificationError, match="hardly moved"):
        identify(flat)
    with pytest.raises(IdentificationError, match="too short"):
        identify(flat[:5])


def test_simc_pi_follows_the_rule():
    m = Model(gain_k_per_pct=0.02, tau_s=100.0, dead_s=10.0, rms_k=0.0, samples=600, step_s=1.0)
    g = simc(m)
    assert g.kp == pytest.approx(100.0 / (0.02 * 20.0))       # tau / (K (tau_c + theta))
    assert g.kp / g.ki == pytest.approx(min(100.0, 4 * 20.0))  # tau_I = min(tau, 4 (tau_c + theta))
    assert g.kd == 0.0
    p = predict(m, g)
    assert p.overshoot_k < 0.3 and p.settling_s is not None


# --- 2. on the twin ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def machine():
    cfg, book = load()
    return cfg, book, Program.from_config(cfg, book)


def test_twin_pump_zone_gain_and_time_constant_recovered(machine):
    cfg, book, program = machine
    # no heater lag, no sensor lag: the pump zone is one thermal node, fed by the held tank
    tw = cfg.twin.model_copy(update={"heater_lag_s": 0.0, "sensors": cfg.twin.sensors.model_copy(
        update={"lag_s": 0.0})})
    z = tw.zones.pump
    cl = tw.chocolate.c_liquid_j_per_kg_k
    flow_w_per_k = tw.circulation.flow_kg_per_s * cl
    conductance = flow_w_per_k + z.ambient_loss_w_per_k + tw.circulation.pump_fountain_conduction_w_per_k
    gain = z.heater_power_w / conductance / 100.0                      # K per %
    tau = (z.chocolate_mass_kg * cl + z.steel_mass_kg * tw.steel_c_j_per_kg_k) / conductance
    outcomes, tuning = autotune(program, tw, ["pump"])
    m = outcomes["pump"].model
    assert outcomes["pump"].status == tune_mod.ACCEPTED, outcomes["pump"].message
    assert m.gain_k_per_pct == pytest.approx(gain, rel=0.15)
    assert m.tau_s == pytest.approx(tau, rel=0.15)
    assert m.dead_s < 3.0          # the PWM window and the scan: no real dead time
    assert tuning["pump"]["kp"] == pytest.approx(outcomes["pump"].gains.kp)


def test_every_zone_of_the_default_twin_gets_a_proposal(machine):
    cfg, book, program = machine
    outcomes, tuning = autotune(program, cfg.twin, accept=False)
    assert set(outcomes) == {"pump", "fountain", "tank_bottom", "tank_wall"}
    for zone, o in outcomes.items():
        assert o.status == tune_mod.PROPOSED, (zone, o.message)
        m = o.model
        assert 0.005 < m.gain_k_per_pct < 0.2 and 10 < m.tau_s < 2000 and 1 < m.dead_s < 40, (zone, m)
        assert o.prediction.ms < 2.0
        assert o.previous == gains_of(program, PlcState(), zone)
    assert tuning == {}            # nothing accepted: nothing changed


# --- 3. abort, accept, refusals ------------------------------------------------------------------

def held_heating(machine) -> Session:
    cfg, book, program = machine
    s = Session.start(program, cfg.twin)
    s.run(lambda r: True, 1.0, StartRecipe("dark-70", user="t"))
    s.run(lambda r: all(z.pv_c is not None and abs(z.pv_c - z.sp_c) < 0.3 for z in r.zones),
          3 * 3600, Hold(user="t"))
    return s


def pump_output(s: Session) -> float:
    return next(z.output_pct for z in s.last.zones if z.name == "pump")


def test_abort_half_way_keeps_the_gains_and_the_output_continuous(machine):
    s = held_heating(machine)
    p = s.controller.program
    before = gains_of(p, s.controller.state, "pump")
    s.run(lambda r: r.state.autotune is not None and r.state.autotune.stage == tune_mod.RELAY
          and len(r.state.autotune.rises) >= 3, 3600, StartAutotune("pump", user="tech"))
    u_relay = pump_output(s)
    r = s.run(lambda r: True, 1.0, AbortAutotune("pump", user="tech"))
    assert r.state.autotune is None
    o = r.state.autotune_outcomes["pump"]
    assert o.status == tune_mod.ABORTED and "aborted by tech" in o.message
    assert gains_of(p, r.state, "pump") == before
    assert abs(pump_output(s) - u_relay) < 5.0          # no bump
    # and the zone goes back to its set-point in closed loop
    s.run(lambda r: abs(r.zones[2].pv_c - r.zones[2].sp_c) < 0.2, 600)
    assert not any(e.kind == "command_refused" for e in r.events)


def test_a_gain_change_is_bumpless():
    """plc.pid.retune: the new gains give, at the same error and derivative, the old output."""
    old = PidTuning(kp=80.0, ki=0.8, kd=0.0, d_filter_s=2.0)
    new = PidTuning(kp=210.0, ki=5.0, kd=900.0, d_filter_s=2.0)
    st = PidState()
    for k in range(300):               # a zone warming towards its set-point under the old gains
        _, st = pid_update(old, st, 48.0, 46.0 + k * 0.005, 0.1)
    u_old, _ = pid_update(old, st, 48.0, 47.5, 0.1)
    u_new, _ = pid_update(new, retune(st, old, new), 48.0, 47.5, 0.1)
    assert u_new == pytest.approx(u_old, abs=1.0)
    u_jump, _ = pid_update(new, st, 48.0, 47.5, 0.1)      # without retune: a bump
    assert abs(u_jump - u_old) > 20.0


def test_accept_applies_the_proposal_and_reject_keeps_the_gains(machine):
    s = held_heating(machine)
    p = s.controller.program
    r = s.run(lambda r: r.state.autotune is None, 3 * 3600, StartAutotune("pump", user="tech"))
    o = r.state.autotune_outcomes["pump"]
    assert o.status == tune_mod.PROPOSED, o.message
    r = s.run(lambda r: True, 1.0, AcceptTuning("pump", user="tech"))
    g = gains_of(p, r.state, "pump")
    assert (g["kp"], g["ki"], g["kd"]) == (o.gains.kp, o.gains.ki, o.gains.kd)
    assert r.state.tuning["pump"]["model_tau_s"] == o.model.tau_s
    assert any(e.kind == "autotune" and e.get("status") == "accepted" for e in r.events)
    # the accepted tuning is what survives a restart
    assert r.state.persistent()["tuning"]["pump"]["kp"] == o.gains.kp
    # a second run, rejected: the gains stay the accepted ones
    r = s.run(lambda r: r.state.autotune is None, 3 * 3600, StartAutotune("pump", user="tech"))
    r = s.run(lambda r: True, 1.0, RejectTuning("pump", user="tech"))
    assert r.state.autotune_outcomes["pump"].status == tune_mod.REJECTED
    assert gains_of(p, r.state, "pump")["kp"] == o.gains.kp


@pytest.mark.parametrize("state, cmd, why", [
    (PlcState(), StartAutotune("pump"), "only while a batch is heating"),
    (PlcState(phase=Phase.POURING, recipe_id="dark-70", tempered=True), StartAutotune("pump"),
     "would spoil the batch"),
    (PlcState(phase=Phase.COOLING, recipe_id="dark-70"), StartAutotune("pump"), "would spoil"),
    (PlcState(phase=Phase.HEATING, recipe_id="dark-70", mixer_run_s=60.0), StartAutotune("nozzle"),
     "unknown zone"),
    (PlcState(phase=Phase.HEATING, recipe_id="dark-70", mixer_run_s=60.0),
     StartAutotune("pump", amplitude_pct=150.0), "amplitude must be within 5..100"),
    (PlcState(phase=Phase.HEATING, recipe_id="dark-70", mixer_run_s=60.0,
              manual={"pump": 10.0}), StartAutotune("pump"), "in manual"),
    (PlcState(phase=Phase.HEATING, recipe_id="dark-70", mixer_run_s=60.0,
              trips=frozenset({"safety.estop"}), first_out="safety.estop"),
     StartAutotune("pump"), "trip is latched"),
    (PlcState(phase=Phase.HEATING, recipe_id="dark-70"), StartAutotune("pump"),
     "heaters are not enabled yet"),
    (PlcState(phase=Phase.HEATING, recipe_id="dark-70", mixer_run_s=60.0,
              autotune=tune_mod.start("tank_wall", "x", 0.0, 30.0)),
     StartAutotune("pump"), "autotune of zone tank_wall is running"),
    (PlcState(), AbortAutotune("pump"), "no autotune is running"),
    (PlcState(), AcceptTuning("pump"), "no autotune proposal"),
    (PlcState(autotune_outcomes={"pump": tune_mod.Outcome("pump", "failed", "x", 0.0, "")}),
     RejectTuning("pump"), "its last autotune: failed"),
])
def test_refused_commands_give_the_reason(machine, state, cmd, why):
    _, _, program = machine
    assert why in check_command(program, state, cmd)


def test_a_refused_autotune_changes_nothing(machine):
    cfg, book, program = machine
    s = Session.start(program, cfg.twin)
    s.run(lambda r: True, 1.0)
    before = s.controller.state
    with pytest.raises(TwinAutotuneError, match="StartAutotune refused"):
        s.run(lambda r: True, 1.0, StartAutotune("pump", user="tech"))
    after = s.controller.state
    assert after.autotune is None and after.autotune_outcomes == before.autotune_outcomes
    assert after.tuning == before.tuning and after.phase is Phase.IDLE


def test_the_experiment_ends_safely_when_the_zone_strays(machine):
    cfg = tune_mod.Settings()
    x = replace(tune_mod.start("pump", "t", 0.0, 30.0), stage=tune_mod.RELAY, u0=20.0,
                u_high=50.0, u_low=0.0, rises=(0.0,))
    o, u = tune_mod.step(x, cfg, now_s=10.0, dt_s=0.1, sp=45.0, pv=45.0 + cfg.max_deviation_k + 0.1,
                         u_pid=0.0, out_min=0.0, out_max=100.0, max_temp_c=60.0)
    assert isinstance(o, tune_mod.Outcome) and o.status == tune_mod.FAILED and u is None
    assert "strayed" in o.message
    o, _ = tune_mod.step(x, cfg, now_s=10.0, dt_s=0.1, sp=45.0, pv=58.5, u_pid=0.0, out_min=0.0,
                         out_max=100.0, max_temp_c=60.0)
    assert isinstance(o, tune_mod.Outcome) and o.status == tune_mod.FAILED
    o, _ = tune_mod.step(x, cfg, now_s=10.0, dt_s=0.1, sp=45.0, pv=45.0, u_pid=0.0, out_min=0.0,
                         out_max=100.0, max_temp_c=60.0, stop="the batch left heating (phase fault)")
    assert o.status == tune_mod.FAILED and "left heating" in o.message
    assert not math.isnan(o.time_s)
