"""PID block and split-range output for one temperature zone. Pure: time comes in as ``dt_s``.

The block (positional form, output in percent, -100 = full cooling … +100 = full heat):

    sp_r   set-point after the ramp limit (``ramp_k_per_min``; 0 = no limit)
    e      = sp_r - pv
    P      = kp * e                                  kp  in %/K
    I     += ki * e * dt_s                           ki  in %/(K*s)
    D      = kd * filtered(-d pv / dt)               kd  in %*s/K, filter time constant d_filter_s
    u      = clamp(P + I + D, out_min, out_max)

Why each piece (the ISA/"textbook" improvements, cf. simple-pid, Åström & Hägglund ch. 3):
- **Derivative on measurement**, low-pass filtered: a set-point step gives no derivative kick,
  and the 0.1 °C quantisation of the sensor is not amplified into output chatter.
- **Anti-windup by conditional integration**: the integral does not grow while the output is
  saturated in the direction of the error, and is itself clamped to the output range, so a long
  heat-up at full power does not leave a charge that overshoots the goal. For a zone without
  cooling the integral stops at ``act_min`` = 0 %: while such a zone is cooled by its
  neighbours (the cooling phase) it does not wind down for nothing and unwind late (an
  undershoot at the end of cooling). P and D keep the whole -100..100 range: clipped at 0 they
  would turn the measurement's noise into a one-sided heat the integral could not take back.
- **Control band** (the seed's ``heat_control_range``, K): outside ±band around the set-point
  the loop saturates (full heat below, full cooling above) and the integral is conditioned to
  the value that makes the output continuous at the band edge (never of the opposite sign of
  the error), so the hand-over is bumpless and does not brake the approach.
- **Set-point ramp** (the seed's ``kl``, read as K/min): the ramped set-point starts from the
  measurement when the loop goes to auto, so a new goal is approached at a bounded rate.
- **Manual/auto, bumpless**: in manual the operator's output is passed through and the integral
  tracks it (I = u_manual - P - D), so switching back to auto continues from the same output.
- **Bad measurement**: the block holds its last output and freezes its integral (the
  interlocks decide what the outputs do).
- **Feed-forward** (``ff``, % of output): what the zone is known to need beyond the feedback -
  the output a moving phase goal asks for (rate / the zone's identified slope), see
  ``plc.scan`` - added to P + I + D inside the band and counted by the anti-windup, so the
  integral carries only what the model does not know. A ramp followed by the integral alone
  ends in an overshoot as large as the integral's charge; followed by its feed-forward, the
  integral stays put and the zone stops at the goal.
- **Independent of the scan period**: ki, kd, the filter and the ramp are per second / minute,
  so the same tuning gives the same response at 10 ms and at 100 ms.

Split range (the seed's ``fc_threshold``, % of cooling demand): a negative output is cooling
demand c = -u. The first cooling stage takes c from 0 to ``fc_threshold`` (duty c/fc), the second
stage adds the rest (duty (c - fc)/(100 - fc)). A zone without cooling outputs just stops heating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class PidTuning:
    kp: float
    ki: float = 0.0
    kd: float = 0.0
    d_filter_s: float = 2.0
    ramp_k_per_min: float = 0.0
    control_band_k: float = math.inf
    out_min: float = -100.0
    out_max: float = 100.0
    act_min: float | None = None    # the lowest output that acts (a zone without cooling: 0):
                                    # the integral's floor


@dataclass(frozen=True, slots=True)
class PidState:
    integral: float = 0.0
    pv_prev: float | None = None
    d_filtered: float = 0.0
    sp_ramped: float | None = None
    output: float = 0.0
    manual: bool = False


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _floor(t: PidTuning) -> float:
    """The integral's lower bound: the output range's, or ``act_min`` (see the module doc)."""
    return t.out_min if t.act_min is None else t.act_min


def ramp(sp_prev: float | None, sp: float, pv: float, rate_k_per_min: float, dt_s: float) -> float:
    """Move the working set-point towards ``sp`` by at most ``rate * dt`` (starts at ``pv``)."""
    if rate_k_per_min <= 0.0:
        return sp
    start = pv if sp_prev is None else sp_prev
    step = rate_k_per_min * dt_s / 60.0
    return _clamp(sp, start - step, start + step)


def pid_update(t: PidTuning, s: PidState, sp: float, pv: float | None, dt_s: float,
               manual_output: float | None = None, ff: float = 0.0) -> tuple[float, PidState]:
    """One step of the block. ``pv`` None means a bad measurement; ``ff``: a feed-forward
    output (%) added to P + I + D inside the band. Returns (output %, state)."""
    if pv is None or dt_s <= 0.0:
        return s.output, s
    # derivative on measurement, first-order filter (exact discretisation of 1/(Tf s + 1))
    if s.pv_prev is None:
        d_f = 0.0
    else:
        d_raw = -(pv - s.pv_prev) / dt_s
        alpha = 1.0 - math.exp(-dt_s / t.d_filter_s) if t.d_filter_s > 0 else 1.0
        d_f = s.d_filtered + alpha * (d_raw - s.d_filtered)
    d_term = t.kd * d_f

    if manual_output is not None:
        u = _clamp(manual_output, t.out_min, t.out_max)
        sp_r = pv if t.ramp_k_per_min > 0 else sp
        p_term = t.kp * (sp_r - pv)
        integral = _clamp(u - p_term - d_term - ff, _floor(t), t.out_max)
        return u, PidState(integral, pv, d_f, sp_r, u, True)

    sp_r = ramp(None if s.manual else s.sp_ramped, sp, pv, t.ramp_k_per_min, dt_s)
    e = sp_r - pv
    p_term = t.kp * e
    if abs(e) > t.control_band_k:
        u = t.out_max if e > 0 else t.out_min
        # condition the integral so the output is continuous when the error enters the band,
        # but never let it oppose the error (with kp * band beyond the output range, P alone
        # already saturates at the edge and the integral starts from zero)
        edge = math.copysign(t.control_band_k, e)
        integral = max(0.0, u - t.kp * edge) if e > 0 else min(0.0, u - t.kp * edge)
        return u, PidState(max(integral, _floor(t)), pv, d_f, sp_r, u, False)

    integral = s.integral
    candidate = integral + t.ki * e * dt_s
    unsat = p_term + candidate + d_term + ff
    # conditional integration: do not wind further into a saturated output
    if not ((unsat > t.out_max and e > 0) or (unsat < t.out_min and e < 0)):
        integral = _clamp(candidate, _floor(t), t.out_max)
    u = _clamp(p_term + integral + d_term + ff, t.out_min, t.out_max)
    return u, PidState(integral, pv, d_f, sp_r, u, False)


def retune(s: PidState, old: PidTuning, new: PidTuning) -> PidState:
    """The state under ``new`` gains that gives the output ``old`` gave (bumpless gain change):
    the integral takes up what P and D change at the last error and derivative."""
    if s.pv_prev is None or s.sp_ramped is None or s.manual:
        return s
    e = s.sp_ramped - s.pv_prev
    shift = (old.kp - new.kp) * e + (old.kd - new.kd) * s.d_filtered
    return replace(s, integral=_clamp(s.integral + shift, new.out_min, new.out_max))


def reset(s: PidState) -> PidState:
    """Forget the history (a new phase or an interlock): keeps nothing but manual mode."""
    return PidState(manual=s.manual)


@dataclass(frozen=True, slots=True)
class SplitOutput:
    heat: float      # duty 0..1
    cool1: float     # duty 0..1
    cool2: float     # duty 0..1


def split_range(u_pct: float, fc_threshold_pct: float) -> SplitOutput:
    """Split a -100..100 % output into heater and two cooling stage duties (see module doc)."""
    if u_pct >= 0.0:
        return SplitOutput(min(u_pct, 100.0) / 100.0, 0.0, 0.0)
    c = min(-u_pct, 100.0)
    fc = _clamp(fc_threshold_pct, 0.0, 100.0)
    if fc <= 0.0:
        return SplitOutput(0.0, 1.0, c / 100.0)
    cool1 = min(c / fc, 1.0)
    cool2 = 0.0 if fc >= 100.0 else max(0.0, (c - fc) / (100.0 - fc))
    return SplitOutput(0.0, cool1, cool2)


@dataclass(frozen=True, slots=True)
class PwmState:
    """Time-proportioning of one on/off output over a window of ``n`` scans.

    The on-time of each window is the duty at the window's start, rounded to whole scans, and the
    rounding remainder is carried into the next window, so the long-run average equals the duty.
    """
    pos: int = 0
    on_ticks: int = 0
    carry: float = 0.0


def pwm_step(s: PwmState, duty: float, window_ticks: int) -> tuple[bool, PwmState]:
    n = max(1, window_ticks)
    if s.pos == 0:
        want = _clamp(duty, 0.0, 1.0) * n + s.carry
        on = int(_clamp(round(want), 0, n))
        s = PwmState(0, on, want - on)
    out = s.pos < s.on_ticks
    return out, replace(s, pos=(s.pos + 1) % n)
