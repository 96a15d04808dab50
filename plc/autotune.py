"""The autotune experiment of one zone, run by the scan. Pure: time comes in as arguments.

A technician starts it (``StartAutotune``) on a zone while a batch is *heating* (the chocolate is
being melted and has not been tempered yet: moving one zone by a fraction of a degree spoils
nothing; in any other phase it would, and the command is refused). While it runs, the sequence
is held (its timers stop), the other zones stay in closed loop, and every interlock stays active.
The experiment, on the zone's own output ``u`` (%) and measurement ``y``:

1. **settle** - the zone's PID holds its set-point; once the zone has stayed within
   ``SETTLE_BAND_K`` for ``settle_s``, the working point ``u0`` is the mean output of the last
   ``settle_s`` (a first-order average).
2. **relay** - an asymmetric relay with hysteresis (Astrom & Hagglund, "Automatic tuning of
   simple regulators", Automatica 20 (1984); the asymmetry as in Berner, Hagglund & Astrom,
   "Asymmetric relay autotuning", J. Process Control 2016): ``u0 + amplitude`` while the zone is
   below ``sp - h``, ``u0 - amplitude * LOW_SHARE`` above ``sp + h`` (each clipped to the
   zone's range: a zone without cooling cannot go below 0 %). ``cycles`` full periods after
   the first switch give the zone's time scale ``Tu``.
3. **step** - the output stays at ``u0 + amplitude`` for ``max(3 Tu, 60 s)`` or until the zone
   is ``step_limit_k`` above its set-point: the low-frequency part of the response, which fixes
   the static gain the relay alone leaves loose.

4. **analyse** - the zone is back in closed loop; the record (one sample per second: time,
   output, measurement) is fitted by ``plc.tuning.fit_step``, one step per scan (some ms each,
   so no scan misses its deadline), SIMC gives the gains and ``plc.tuning.predict`` the
   closed-loop figures: the *proposal*. Nothing changes until the
technician accepts it (``AcceptTuning``, bumpless like any gain change, persisted, audited) or
rejects it. While the relay or the step drives the output, the PID tracks it as it tracks a
manual output, so the zone returns to closed loop without a bump - after the experiment, after
an ``AbortAutotune`` and after any automatic abort:

- the batch leaves heating, a trip latches, the zone is put in manual or its sensor goes bad;
- the zone strays more than ``max_deviation_k`` from its set-point, or comes within
  ``HIGH_LIMIT_MARGIN_K`` of its high limit;
- no result within ``max_duration_s``; the zone does not settle within ``settle_max_s``;
  the output has no room around its working point.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

from .tuning import (Fitting, Gains, IdentificationError, Model, Prediction, fit_step, predict,
                     simc)

SETTLE_BAND_K = 0.3
LOW_SHARE = 0.67            # the relay's low side, as a share of its amplitude
HIGH_LIMIT_MARGIN_K = 2.0
SAMPLE_S = 1.0
STUCK_OFF_MIN_S = 120.0     # the relay's low side ends after this long ...
STUCK_OFF_FACTOR = 3.0      # ... and this many times the last high side, crossing or not
MIN_ROOM_PCT = 10.0

# stages of a running experiment, then the outcomes
SETTLE, RELAY, STEP, ANALYSE = "settle", "relay", "step", "analyse"
PROPOSED, ACCEPTED, REJECTED, ABORTED, FAILED = "proposed", "accepted", "rejected", "aborted", "failed"
RUNNING_STAGES = (SETTLE, RELAY, STEP, ANALYSE)


@dataclass(frozen=True, slots=True)
class Settings:
    amplitude_pct: float = 30.0
    hysteresis_k: float = 0.15
    cycles: int = 3
    settle_s: float = 60.0
    settle_max_s: float = 1800.0
    max_deviation_k: float = 1.5
    step_limit_k: float = 1.0
    max_duration_s: float = 5400.0


@dataclass(frozen=True, slots=True)
class Experiment:
    zone: str
    user: str
    started_s: float
    amplitude_pct: float = 30.0
    stage: str = SETTLE
    stage_since_s: float = 0.0
    settled_s: float = 0.0
    u_avg: float | None = None
    u0: float = 0.0
    u_high: float = 0.0
    u_low: float = 0.0
    relay_on: bool = True
    rises: tuple[float, ...] = ()        # times the relay switched up
    falls: tuple[float, ...] = ()        # times the relay switched down
    period_s: float = 0.0
    samples: tuple[tuple[float, float, float], ...] = ()
    next_sample_s: float = 0.0
    output: float = 0.0                  # what the experiment drives (relay, step)
    fitting: Fitting | None = None       # the identification, one step per scan (analyse)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The last autotune of a zone: the proposal, or why there is none, and what became of it."""
    zone: str
    status: str                          # proposed | accepted | rejected | aborted | failed
    message: str
    time_s: float
    user: str
    model: Model | None = None
    gains: Gains | None = None
    prediction: Prediction | None = None
    previous: Mapping[str, float] = field(default_factory=dict)   # kp, ki, kd before


@dataclass(frozen=True, slots=True)
class View:
    """What observers see of a zone's autotune (the snapshot carries one per zone that has one)."""
    zone: str
    stage: str              # settle | relay | step | proposed | accepted | rejected | aborted | failed
    progress_pct: float
    message: str
    outcome: Outcome | None


def start(zone: str, user: str, now_s: float, amplitude_pct: float) -> Experiment:
    return Experiment(zone=zone, user=user, started_s=now_s, amplitude_pct=amplitude_pct,
                      stage_since_s=now_s, next_sample_s=now_s)


def progress(x: Experiment, cfg: Settings) -> float:
    if x.stage == SETTLE:
        return 10.0 * min(1.0, x.settled_s / max(cfg.settle_s, 1e-9))
    if x.stage == RELAY:
        return 10.0 + 60.0 * min(1.0, max(0, len(x.rises) - 1) / (cfg.cycles + 1))
    if x.stage == ANALYSE:
        return 95.0
    return 70.0


def step(x: Experiment, cfg: Settings, *, now_s: float, dt_s: float, sp: float | None,
         pv: float | None, u_pid: float, out_min: float, out_max: float, max_temp_c: float,
         stop: str = "") -> tuple[Experiment | Outcome, float | None]:
    """Advance the experiment by one scan. ``u_pid``: what the zone's PID gives this scan;
    ``stop``: a reason to end it now (the caller's checks: phase, trips, manual). Returns the
    experiment (or its outcome when it ends) and the output the experiment imposes (None: the
    PID's own)."""
    def end(status: str, message: str) -> tuple[Outcome, None]:
        return Outcome(x.zone, status, message, now_s, x.user), None

    if stop:
        return end(ABORTED if stop.startswith("aborted") else FAILED, stop)
    if x.stage == ANALYSE:      # the zone is back in closed loop; the record is complete
        return _analyse(x, now_s), None
    if pv is None or sp is None:
        return end(FAILED, "the zone's measurement or set-point is lost")
    if now_s - x.started_s > cfg.max_duration_s:
        return end(FAILED, f"no result within {cfg.max_duration_s:g} s")
    err = sp - pv
    if x.stage != SETTLE and abs(err) > cfg.max_deviation_k:
        return end(FAILED, f"the zone strayed {-err:+.2f} K from its set-point "
                           f"(limit {cfg.max_deviation_k:g} K)")
    if pv >= max_temp_c - HIGH_LIMIT_MARGIN_K:
        return end(FAILED, f"the zone came within {HIGH_LIMIT_MARGIN_K:g} K of its high limit "
                           f"{max_temp_c:g} degC")

    if x.stage == SETTLE:
        tau = max(cfg.settle_s, 1.0)
        u_avg = u_pid if x.u_avg is None else x.u_avg + (u_pid - x.u_avg) * min(1.0, dt_s / tau)
        settled = x.settled_s + dt_s if abs(err) <= SETTLE_BAND_K else 0.0
        x = replace(x, u_avg=u_avg, settled_s=settled)
        if now_s - x.stage_since_s > cfg.settle_max_s:
            return end(FAILED, f"the zone did not settle within {SETTLE_BAND_K:g} K of its "
                               f"set-point in {cfg.settle_max_s:g} s")
        if settled < cfg.settle_s:
            return x, None
        u0 = u_avg
        high = min(out_max, u0 + x.amplitude_pct)
        low = max(out_min, u0 - x.amplitude_pct * LOW_SHARE)
        if high - u0 < MIN_ROOM_PCT:
            return end(FAILED, f"no room to raise the output above its working point "
                               f"{u0:.1f} % (the zone needs most of its heat to hold)")
        x = replace(x, stage=RELAY, stage_since_s=now_s, u0=u0, u_high=high, u_low=low,
                    relay_on=True, rises=(now_s,), next_sample_s=now_s)

    if x.stage == RELAY:
        on = True if err > cfg.hysteresis_k else False if err < -cfg.hysteresis_k else x.relay_on
        if not on and not x.relay_on and x.falls and now_s - x.falls[-1] > max(
                STUCK_OFF_MIN_S, STUCK_OFF_FACTOR * (x.falls[-1] - x.rises[-1])):
            on = True       # the zone does not come back below sp - h on the low side: go on
        if on and x.relay_on and now_s - x.rises[-1] > max(
                STUCK_OFF_MIN_S, STUCK_OFF_FACTOR * ((x.rises[-1] - x.falls[-1]) if x.falls
                                                     else cfg.settle_s)):
            if x.u_high >= out_max - 1e-9:
                return end(FAILED, f"the zone does not rise {cfg.hysteresis_k:g} K above its "
                                   f"set-point even at {out_max:.0f} %: it has no heat to spare "
                                   f"at this working point")
            # the high side does not lift the zone: the zone's whole range, from now on
            x = replace(x, u_high=out_max, rises=x.rises[:-1] + (now_s,))
        rises = x.rises + (now_s,) if (on and not x.relay_on) else x.rises
        falls = x.falls + (now_s,) if (x.relay_on and not on) else x.falls
        x = replace(x, relay_on=on, rises=rises, falls=falls)
        if len(rises) >= cfg.cycles + 2:    # the first rise starts the relay; cycles + 1 more
            period = (rises[-1] - rises[1]) / cfg.cycles
            x = replace(x, stage=STEP, stage_since_s=now_s, period_s=period)
        elif now_s - x.stage_since_s > cfg.max_duration_s / 2 and len(rises) < 2:
            return end(FAILED, f"the relay does not make the zone oscillate (between "
                               f"{x.u_low:.0f} and {x.u_high:.0f} %)")

    if x.stage == STEP:
        if now_s - x.stage_since_s >= max(3.0 * x.period_s, 60.0) or -err >= cfg.step_limit_k:
            # the record is complete: the PID takes the zone back (bumpless, it tracked the
            # experiment) while the next scans identify the model, one step each
            return replace(x, stage=ANALYSE, stage_since_s=now_s, fitting=Fitting(),
                           samples=x.samples + ((now_s, x.u_high, pv),)), None

    u = x.u_high if (x.stage == STEP or x.relay_on) else x.u_low
    x = replace(x, output=u)
    if now_s >= x.next_sample_s - 1e-9:
        x = replace(x, samples=x.samples + ((now_s, u, pv),), next_sample_s=now_s + SAMPLE_S)
    return x, u


def _analyse(x: Experiment, now_s: float) -> Experiment | Outcome:
    """One step of the identification; the proposal once the model is known."""
    try:
        f = fit_step(x.samples, x.fitting)
    except IdentificationError as e:
        return Outcome(x.zone, FAILED, f"identification failed: {e}", now_s, x.user)
    if isinstance(f, Fitting):
        return replace(x, fitting=f)
    model = f
    gains = simc(model)
    pred = predict(model, gains)
    kind = "integrating, " if model.integrating else ""
    msg = (f"model: {kind}K {model.gain_k_per_pct:.4g} K/%, tau {model.tau_s:.1f} s, "
           f"dead time {model.dead_s:.1f} s (fit {model.rms_k:.3f} K)")
    if model.lag_s > 0:
        msg += (f", read as a lag of {model.lag_s:.1f} s and a dead time of "
                f"{model.lag_dead_s:.1f} s")
    msg += (f"; proposed kp {gains.kp:.3g} %/K, ki {gains.ki:.3g} %/(K*s), kd {gains.kd:.3g} "
            f"%*s/K; predicted overshoot {pred.overshoot_k:.2f} K on a 1 K step, Ms {pred.ms:.2f}")
    return Outcome(x.zone, PROPOSED, msg, now_s, x.user, model, gains, pred)


def view(zone: str, x: Experiment | None, outcome: Outcome | None, cfg: Settings) -> View:
    if x is not None and x.zone == zone:
        msg = {SETTLE: "settling at the set-point", RELAY: f"relay, {max(0, len(x.rises) - 1)} "
               f"of {cfg.cycles + 1} periods", STEP: "step response",
               ANALYSE: "identifying the model"}[x.stage]
        return View(zone, x.stage, progress(x, cfg), msg, outcome)
    if outcome is None:
        return View(zone, "idle", 0.0, "", None)
    return View(zone, outcome.status, 100.0 if outcome.status in (PROPOSED, ACCEPTED) else 0.0,
                outcome.message, outcome)
