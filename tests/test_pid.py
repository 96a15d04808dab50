"""plc.pid: the PID block, the set-point ramp, split range and PWM, in virtual time.

Each property the module docstring promises gets a table or a closed-loop check that would fail
if the property were lost (e.g. the period-independence test fails if ``ki`` is applied per
scan instead of per second).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from plc.pid import (PidState, PidTuning, PwmState, SplitOutput, pid_update, pwm_step, ramp,
                     split_range)


def run_const(t: PidTuning, sp: float, pv: float, dt: float, n: int, s: PidState | None = None):
    s = s or PidState()
    u = 0.0
    for _ in range(n):
        u, s = pid_update(t, s, sp, pv, dt)
    return u, s


# --- proportional -----------------------------------------------------------------------------

@pytest.mark.parametrize("kp, sp, pv, expected", [
    (2.0, 50.0, 40.0, 20.0),
    (2.0, 40.0, 50.0, -20.0),
    (4.0, 45.5, 45.0, 2.0),
    (1.0, 45.0, 45.0, 0.0),
    (10.0, 50.0, 30.0, 100.0),     # clamped at out_max
    (10.0, 30.0, 50.0, -100.0),    # clamped at out_min
    (40.0, 31.5, 31.0, 20.0),
])
def test_p_only_step(kp, sp, pv, expected):
    u, s = pid_update(PidTuning(kp=kp), PidState(), sp, pv, 0.1)
    assert u == pytest.approx(expected)
    assert s.output == pytest.approx(expected)
    assert s.integral == 0.0


def test_p_only_respects_custom_output_range():
    t = PidTuning(kp=10.0, out_min=0.0, out_max=50.0)
    assert pid_update(t, PidState(), 50.0, 40.0, 0.1)[0] == 50.0
    assert pid_update(t, PidState(), 40.0, 50.0, 0.1)[0] == 0.0


# --- integral ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ki, e, dt, n", [
    (0.5, 2.0, 0.1, 10),
    (0.5, 2.0, 0.01, 100),
    (0.25, -1.0, 0.1, 40),
    (1.0, 0.5, 1.0, 7),
])
def test_integral_accumulates_ki_e_dt(ki, e, dt, n):
    u, s = run_const(PidTuning(kp=0.0, ki=ki), 40.0 + e, 40.0, dt, n)
    assert s.integral == pytest.approx(ki * e * dt * n)
    assert u == pytest.approx(ki * e * dt * n)


def test_integral_is_clamped_to_output_range():
    # kp = 0 so the output never saturates before the integral does
    _, s = run_const(PidTuning(kp=0.0, ki=10.0), 50.0, 40.0, 0.1, 1000)
    assert s.integral == 100.0


def test_anti_windup_leaves_saturation_promptly():
    """Long saturation (e=+2 K for 1000 s at full heat), then the error reverses to -0.5 K."""
    t = PidTuning(kp=40.0, ki=0.25)
    dt = 0.1
    s = PidState()
    naive_i = 0.0
    for _ in range(10_000):
        u, s = pid_update(t, s, 50.0, 48.0, dt)
        naive_i += t.ki * 2.0 * dt
    # saturated since about 40 s in (conditional integration may stop one ki*e*dt short)
    assert u >= 100.0 - t.ki * 2.0 * dt - 1e-9
    assert s.integral <= 100.0 - t.kp * 2.0 + t.ki * 2.0 * dt + 1e-9  # stopped at the limit

    steps_ours = steps_naive = None
    for k in range(1, 100_000):
        u, s = pid_update(t, s, 50.0, 50.5, dt)
        naive_i += t.ki * -0.5 * dt
        naive_u = max(-100.0, min(100.0, t.kp * -0.5 + naive_i))
        if steps_ours is None and u < 99.0:
            steps_ours = k
        if steps_naive is None and naive_u < 99.0:
            steps_naive = k
        if steps_ours and steps_naive:
            break
    assert steps_ours == 1            # leaves saturation on the first reversed step
    assert steps_naive > 10_000       # a naive integrator stays saturated for > 1000 s
    assert steps_ours < steps_naive


def test_anti_windup_integrates_out_of_saturation():
    """Saturated high with a negative error: the integral must still be allowed to fall."""
    t = PidTuning(kp=0.0, ki=1.0)
    s = PidState(integral=100.0, output=100.0)
    u, s2 = pid_update(t, s, 40.0, 41.0, 0.1)
    assert s2.integral == pytest.approx(99.9)
    assert u == pytest.approx(99.9)


# --- derivative -------------------------------------------------------------------------------

def test_setpoint_step_gives_no_derivative_kick():
    t = PidTuning(kp=2.0, kd=50.0, d_filter_s=0.0)
    u, s = run_const(t, 40.0, 40.0, 0.1, 5)
    assert u == 0.0
    u, s = pid_update(t, s, 41.0, 40.0, 0.1)
    assert u == pytest.approx(2.0)        # P only: kp * 1 K, no kd * d(e)/dt
    assert s.d_filtered == 0.0


@pytest.mark.parametrize("kp, kd, dpv, dt, expected", [
    (0.0, 5.0, 0.1, 1.0, -0.5),           # D = kd * -(dpv/dt)
    (2.0, 5.0, 0.1, 1.0, -0.7),           # P -0.2 plus D -0.5
    (0.0, 1.0, 1.0, 0.1, -10.0),
    (0.0, 1.0, -1.0, 0.1, 10.0),          # falling measurement: derivative pushes heat
])
def test_measurement_step_gives_derivative(kp, kd, dpv, dt, expected):
    t = PidTuning(kp=kp, kd=kd, d_filter_s=0.0)
    _, s = run_const(t, 40.0, 40.0, dt, 3)
    u, s = pid_update(t, s, 40.0, 40.0 + dpv, dt)
    assert u == pytest.approx(expected)


def test_first_sample_has_no_derivative():
    t = PidTuning(kp=0.0, kd=100.0, d_filter_s=0.0)
    u, s = pid_update(t, PidState(), 40.0, 30.0, 0.1)
    assert u == 0.0 and s.pv_prev == 30.0


@pytest.mark.parametrize("tf, dt", [(2.0, 0.1), (2.0, 0.01), (0.5, 0.1), (5.0, 1.0)])
def test_derivative_filter_is_first_order(tf, dt):
    t = PidTuning(kp=0.0, kd=1.0, d_filter_s=tf)
    _, s = run_const(t, 40.0, 40.0, dt, 2)
    u, s = pid_update(t, s, 40.0, 41.0, dt)     # step of +1 K in one sample
    alpha = 1.0 - math.exp(-dt / tf)
    assert u == pytest.approx(-alpha / dt)
    assert abs(u) < 1.0 / dt                    # smaller than the unfiltered kick
    for k in range(1, 20):
        u, s = pid_update(t, s, 40.0, 41.0, dt)
        assert u == pytest.approx(-alpha / dt * math.exp(-dt / tf) ** k)


@pytest.mark.parametrize("dt", [0.01, 0.1, 0.5])
def test_derivative_of_ramp_converges_to_slope_at_any_period(dt):
    t = PidTuning(kp=0.0, kd=1.0, d_filter_s=2.0)
    s = PidState()
    u = 0.0
    for k in range(round(30.0 / dt)):
        u, s = pid_update(t, s, 100.0, 20.0 + 0.05 * k * dt, dt)   # rising 0.05 K/s
    assert u == pytest.approx(-0.05, rel=1e-3)


# --- control band -----------------------------------------------------------------------------

@pytest.mark.parametrize("kp, band, sp, pv, expected", [
    (40.0, 3.0, 48.0, 40.0, 100.0),      # far below: full heat
    (40.0, 3.0, 48.0, 56.0, -100.0),     # far above: full cooling
    (10.0, 3.0, 48.0, 44.9, 100.0),
    (10.0, 3.0, 48.0, 51.1, -100.0),
    (10.0, 3.0, 48.0, 46.0, 20.0),       # inside: plain P
    (10.0, 3.0, 48.0, 50.0, -20.0),
])
def test_control_band_saturates_outside(kp, band, sp, pv, expected):
    u, _ = pid_update(PidTuning(kp=kp, ki=0.0, control_band_k=band), PidState(), sp, pv, 0.1)
    assert u == pytest.approx(expected)


@pytest.mark.parametrize("kp, ki, side", [
    (40.0, 0.25, +1), (40.0, 0.25, -1), (10.0, 0.25, +1), (10.0, 0.25, -1), (5.0, 1.0, +1),
])
def test_control_band_edge_is_continuous(kp, ki, side):
    t = PidTuning(kp=kp, ki=ki, control_band_k=3.0)
    sp, dt = 48.0, 0.1
    u_out, s = pid_update(t, PidState(), sp, sp - side * 3.001, dt)
    assert u_out == side * 100.0
    # conditioned for continuity at the edge, but never against the error
    assert s.integral == pytest.approx(side * max(0.0, 100.0 - kp * 3.0))
    u_in, s = pid_update(t, s, sp, sp - side * 2.999, dt)
    assert abs(u_in - u_out) < 0.5       # no bump crossing into the band
    if kp * 3.0 < 90.0:  # without the conditioned integral the output would drop to kp * e
        assert abs(u_in - kp * side * 2.999) > 5.0


# --- manual / auto ----------------------------------------------------------------------------

@pytest.mark.parametrize("tuning", [
    PidTuning(kp=40.0, ki=0.25, control_band_k=3.0),
    PidTuning(kp=40.0, ki=0.25, ramp_k_per_min=6.0, control_band_k=3.0),
    PidTuning(kp=30.0, ki=0.3, kd=20.0, d_filter_s=2.0),
])
@pytest.mark.parametrize("manual_u", [37.0, -55.0, 0.0, 100.0])
def test_manual_to_auto_is_bumpless(tuning, manual_u):
    sp, dt = 31.5, 0.1
    s = PidState()
    for k in range(100):
        _, s = pid_update(tuning, s, sp, 31.0 + 0.001 * k, dt)
    for k in range(50):
        u, s = pid_update(tuning, s, sp, 31.1 + 0.001 * k, dt, manual_output=manual_u)
        assert u == manual_u and s.manual
    u_auto, s = pid_update(tuning, s, sp, 31.15, dt)
    assert not s.manual
    assert abs(u_auto - manual_u) < 1.0


def test_manual_output_is_clamped():
    t = PidTuning(kp=1.0)
    assert pid_update(t, PidState(), 40.0, 40.0, 0.1, manual_output=150.0)[0] == 100.0
    assert pid_update(t, PidState(), 40.0, 40.0, 0.1, manual_output=-150.0)[0] == -100.0


# --- set-point ramp ---------------------------------------------------------------------------

@pytest.mark.parametrize("sp_prev, sp, pv, rate, dt, expected", [
    (None, 50.0, 20.0, 6.0, 60.0, 26.0),     # starts at the measurement, 6 K/min
    (30.0, 50.0, 20.0, 6.0, 1.0, 30.1),      # continues from the previous working set-point
    (30.0, 25.0, 20.0, 6.0, 10.0, 29.0),     # downwards too
    (30.0, 30.05, 20.0, 6.0, 1.0, 30.05),    # within one step: reaches it
    (30.0, 50.0, 20.0, 0.0, 0.1, 50.0),      # rate 0: no limit
    (None, 20.0, 48.0, 12.0, 30.0, 42.0),
])
def test_ramp_table(sp_prev, sp, pv, rate, dt, expected):
    assert ramp(sp_prev, sp, pv, rate, dt) == pytest.approx(expected)


@pytest.mark.parametrize("dt", [0.01, 0.1, 1.0])
def test_pid_ramps_setpoint_in_k_per_min(dt):
    t = PidTuning(kp=1.0, ramp_k_per_min=6.0)
    _, s = run_const(t, 50.0, 20.0, dt, round(60.0 / dt))
    assert s.sp_ramped == pytest.approx(26.0)
    _, s = run_const(t, 50.0, 20.0, dt, round(240.0 / dt), s)
    assert s.sp_ramped == pytest.approx(50.0)   # reached, then held


# --- bad measurement --------------------------------------------------------------------------

@pytest.mark.parametrize("dt", [0.1, 0.0, -1.0])
def test_bad_measurement_holds_output_and_state(dt):
    t = PidTuning(kp=40.0, ki=0.25, kd=5.0)
    u0, s = run_const(t, 48.0, 47.5, 0.1, 30)
    for _ in range(100):
        u, s2 = pid_update(t, s, 48.0, None if dt > 0 else 40.0, dt)
        assert u == u0
        assert s2 == s


# --- period independence ----------------------------------------------------------------------

def closed_loop(dt: float, t_end: float = 300.0, sample_s: float = 1.0) -> list[float]:
    """First-order plant (tau 40 s, gain 0.4 K/%, ambient 20 degC) under PID, exact ZOH."""
    tau, gain, amb = 40.0, 0.4, 20.0
    t = PidTuning(kp=8.0, ki=0.2, kd=10.0, d_filter_s=2.0, ramp_k_per_min=12.0,
                  control_band_k=5.0)
    s = PidState()
    temp = 20.0
    out = []
    every = round(sample_s / dt)
    for k in range(round(t_end / dt) + 1):
        if k % every == 0:
            out.append(temp)
        u, s = pid_update(t, s, 45.0, temp, dt)
        target = amb + gain * u
        temp = target + (temp - target) * math.exp(-dt / tau)
    return out


def test_same_tuning_same_response_at_10ms_and_100ms():
    fast, slow = closed_loop(0.01), closed_loop(0.1)
    assert len(fast) == len(slow) == 301
    worst = max(abs(a - b) for a, b in zip(fast, slow))
    assert worst < 0.05
    assert fast[-1] == pytest.approx(45.0, abs=0.05)    # and it actually controls


# --- split range ------------------------------------------------------------------------------

@pytest.mark.parametrize("u, fc, expected", [
    (50.0, 50.0, (0.5, 0.0, 0.0)),
    (100.0, 50.0, (1.0, 0.0, 0.0)),
    (150.0, 50.0, (1.0, 0.0, 0.0)),
    (0.0, 50.0, (0.0, 0.0, 0.0)),
    (-25.0, 50.0, (0.0, 0.5, 0.0)),
    (-50.0, 50.0, (0.0, 1.0, 0.0)),
    (-75.0, 50.0, (0.0, 1.0, 0.5)),
    (-100.0, 50.0, (0.0, 1.0, 1.0)),
    (-150.0, 50.0, (0.0, 1.0, 1.0)),
    (-10.0, 20.0, (0.0, 0.5, 0.0)),
    (-60.0, 20.0, (0.0, 1.0, 0.5)),
    (-25.0, 100.0, (0.0, 0.25, 0.0)),    # fc 100: the second stage never runs
    (-100.0, 100.0, (0.0, 1.0, 0.0)),
    (-25.0, 120.0, (0.0, 0.25, 0.0)),    # clamped to 100
    (-25.0, 0.0, (0.0, 1.0, 0.25)),      # fc 0: first stage on at any demand, second ramps
    (-100.0, 0.0, (0.0, 1.0, 1.0)),
    (-25.0, -10.0, (0.0, 1.0, 0.25)),    # clamped to 0
    (30.0, 0.0, (0.3, 0.0, 0.0)),
])
def test_split_range_table(u, fc, expected):
    out = split_range(u, fc)
    assert isinstance(out, SplitOutput)
    assert (out.heat, out.cool1, out.cool2) == pytest.approx(expected)
    assert not (out.heat > 0 and (out.cool1 > 0 or out.cool2 > 0))   # never heat and cool


@pytest.mark.parametrize("fc", [0.0, 20.0, 50.0, 80.0, 100.0])
def test_split_range_is_monotonic_in_cooling_demand(fc):
    prev = split_range(0.0, fc)
    for c in range(1, 101):
        cur = split_range(-float(c), fc)
        assert cur.cool1 >= prev.cool1 and cur.cool2 >= prev.cool2
        prev = cur


# --- PWM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 3, 7, 10])
@pytest.mark.parametrize("duty", [0.0, 0.05, 0.1, 1 / 3, 0.5, 0.77, 0.999, 1.0])
def test_pwm_average_equals_duty(duty, window):
    s = PwmState()
    windows = 300
    on = 0
    for _ in range(windows * window):
        o, s = pwm_step(s, duty, window)
        on += o
    assert abs(on / (windows * window) - duty) <= 0.5 / (windows * window) + 1e-12


@pytest.mark.parametrize("duty, window, pattern", [
    (0.3, 10, [True] * 3 + [False] * 7),
    (0.0, 5, [False] * 5),
    (1.0, 4, [True] * 4),
    (1.5, 4, [True] * 4),          # clamped
    (-0.5, 4, [False] * 4),        # clamped
])
def test_pwm_first_window_pattern(duty, window, pattern):
    s = PwmState()
    got = []
    for _ in range(window):
        o, s = pwm_step(s, duty, window)
        got.append(o)
    assert got == pattern


def test_pwm_duty_change_takes_effect_at_next_window():
    s = PwmState()
    got = []
    for k in range(20):
        o, s = pwm_step(s, 0.2 if k < 5 else 0.8, 10)
        got.append(o)
    assert got[:10] == [True] * 2 + [False] * 8
    assert got[10:] == [True] * 8 + [False] * 2


def test_pwm_state_is_not_mutated():
    s = PwmState()
    _, s2 = pwm_step(s, 0.5, 4)
    assert s == PwmState() and s2 is not s and replace(s2) == s2


# --- a zone without cooling: the integral stops at act_min -------------------------------------

def test_integral_of_a_zone_without_cooling_stops_at_zero_while_p_keeps_its_range():
    t = PidTuning(kp=50.0, ki=1.0, act_min=0.0)
    u, s = run_const(t, sp=27.5, pv=28.5, dt=0.1, n=6000)   # cooled by its neighbours for 10 min
    assert s.integral == 0.0 and u == pytest.approx(-50.0)   # P below 0, the integral not
    # back at the set-point the output is the integral's at once: no wound-down charge to undo
    u, s = pid_update(t, s, 27.5, 27.5, 0.1)
    assert u == pytest.approx(0.0, abs=0.5)
    # the same without act_min winds down to the range's end and starts from there
    free = PidTuning(kp=50.0, ki=1.0)
    _, s2 = run_const(free, sp=27.5, pv=28.5, dt=0.1, n=6000)
    assert s2.integral < -40.0
