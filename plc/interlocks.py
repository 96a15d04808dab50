"""Safety interlocks: from the input image to conditions (alarm ids, active, trip or not).

Pure. Evaluated every scan before the sequence. A *trip* condition latches (see ``scan.py``):
outputs go to their safe state in the same scan, the first trip is recorded as first-out, and
only an explicit reset clears it once the condition is gone.

Condition ids and what raises them:
    estop                        e-stop chain open, or its input not good            trip
    zone.<z>.sensor              input bad, NaN, above the plausibility limit (open),
                                 below it (short), or unchanged for ``stuck_s`` while
                                 the zone is driven hard (stuck)                     trip
    zone.<z>.over_temp           above min(zone max_temp, abs_max_heat)              trip   S
    zone.<z>.under_temp          below max(zone min_temp, abs_min_heat)              trip   S
    zone.<z>.deviation_warning   |pv - goal| > warning_limit once at goal (delayed)  alarm  S G
    zone.<z>.deviation_error     |pv - goal| > error_limit once at goal (delayed);
                                 pouring is withheld while active                    alarm  S G
    zone.<z>.above_working_max   tempered and above the recipe's working maximum;
                                 the zone's heater is forced off                     alarm  S
    zone.<z>.no_progress         heating output >= NO_PROGRESS_DRIVE_PCT for
                                 ``no_progress_s`` without the reading rising by
                                 ``no_progress_k``: heater or element failure
                                 (while heating, also before the goal is reached)    alarm  S
    motor.<m>.over_current       above its limit for alarm_delay_s, or input bad
                                 (never active for a motor without a limit)          trip
    grid.current                 highest phase current above the limit (delayed)     trip   B
    grid.phase_loss              a monitored phase below half its low limit          trip   B
    grid.voltage                 a phase outside the voltage limits (delayed), or a
                                 grid input bad (monitoring unavailable)             trip
    grid.frequency               frequency outside nominal +- tolerance (delayed)    trip   B
    plc.watchdog                 the runtime's scan watchdog fired                   trip
    plc.window                   the plant window (OPC UA server, records, historian)
                                 is gone or silent; the PLC goes on controlling      alarm
    io.uncertain                 an input has uncertain quality (stale)              alarm

Suppressed by design (``Condition.suppressed``, ISA-18.2 §11 / OPC UA Part 9 §5.8.3: the
alarm exists but is not annunciated; its interlock, if any, is unaffected): S while the zone's
sensor is faulty (the sensor alarm speaks for it), G while the zone has no goal (no running
phase), B while a grid input is bad (``grid.voltage`` reports it).

Every condition is reported every scan with a message that says what happened in both
directions ("over-temperature 61.2 degC > 60 degC" / "temperature within 60 degC (59.8
degC)"), the value it was decided on and the limit it was compared with, where it has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from .alarms import Condition, Priority
from .contract import MOTORS
from .image import ProcessImage, Quality
from .program import Program

ZONE_CONDITIONS = ("sensor", "over_temp", "under_temp", "deviation_warning", "deviation_error",
                   "above_working_max", "no_progress")
GRID_CONDITIONS = ("current", "phase_loss", "voltage", "frequency")


def condition_ids(p: Program) -> tuple[str, ...]:
    """Every condition id ``evaluate`` can raise for this program (the list in the docstring):
    what an alarm list (OPC UA Alarms folder) has one entry for."""
    return ("estop",
            *(f"zone.{z.name}.{c}" for z in p.zones for c in ZONE_CONDITIONS),
            *(f"motor.{m}.over_current" for m in MOTORS),
            *(f"grid.{c}" for c in GRID_CONDITIONS),
            "plc.watchdog", "plc.window", "io.uncertain")


STUCK_DRIVE_PCT = 50.0      # a zone driven harder than this must show its reading move
NO_PROGRESS_DRIVE_PCT = 95.0  # "full" heating output for the no-progress watch
TIME_EPS_S = 1e-6  # timers sum dt in floating point: 20 x 0.1 s must count as 2 s


@dataclass(frozen=True, slots=True)
class ZoneReading:
    pv: float | None        # usable temperature, None when the sensor is faulty
    fault: str              # "" or the sensor fault reason


def read_zone(p: Program, inputs: ProcessImage, zone: str) -> ZoneReading:
    pt = inputs.get_point(f"temp_{zone}")
    if pt.quality is Quality.BAD:
        return ZoneReading(None, f"input bad: {pt.reason or 'no reason given'}")
    v = float(pt.value)
    if math.isnan(v):
        return ZoneReading(None, "reading is NaN")
    if v > p.limits.sensor_high_c:
        return ZoneReading(None, f"open sensor (reads {v:.1f} degC)")
    if v < p.limits.sensor_low_c:
        return ZoneReading(None, f"shorted sensor (reads {v:.1f} degC)")
    return ZoneReading(v, "")


def _delayed(timers: dict[str, float], key: str, raw: bool, dt_s: float, delay_s: float) -> bool:
    """On-delay: ``raw`` must hold for ``delay_s`` before the condition is active."""
    t = timers.get(key, 0.0) + dt_s if raw else 0.0
    if t:
        timers[key] = t
    else:
        timers.pop(key, None)
    return raw and t >= delay_s - TIME_EPS_S


def evaluate(p: Program, inputs: ProcessImage, readings: Mapping[str, ZoneReading],
             stuck: Mapping[str, bool], goals: Mapping[str, float | None],
             reached: Mapping[str, bool], working_max_c: float | None,
             watchdog: str, timers: Mapping[str, float],
             dt_s: float, window: str = "",
             heat_pct: Mapping[str, float] | None = None) -> tuple[list[Condition], dict[str, float]]:
    """Every condition of the table above, once, in that order. ``heat_pct``: each zone's
    heating output of the last scan (0..100 %, 0 when the sequence does not run); ``timers``:
    the on-delay timers (s) and the no-progress watch (``np.<z>`` s, ``np_ref.<z>`` degC)."""
    lim = p.limits
    t = dict(timers)
    out: list[Condition] = []
    add = out.append
    heat = heat_pct or {}

    est = inputs.get_point("estop_ok")
    if est.quality is not Quality.GOOD:
        add(Condition("estop", True, f"E-stop input not good: {est.reason}", Priority.CRITICAL, True))
    else:
        add(Condition("estop", not bool(est.value), "E-stop pressed (chain open)" if not est.value
                      else "E-stop chain closed", Priority.CRITICAL, True))

    for z in p.zones:
        _zone(p, z.name, z.max_temp_c, z.min_temp_c, readings[z.name], stuck[z.name],
              goals.get(z.name), reached[z.name], working_max_c, heat.get(z.name, 0.0),
              t, dt_s, add)

    for m in MOTORS:
        limit = lim.motor_current_a[m]
        if limit <= 0:
            add(Condition(f"motor.{m}.over_current", False,
                          f"Motor {m}: current not monitored (no limit configured)",
                          Priority.HIGH, True))
            continue
        pt = inputs.get_point(f"current_{m}")
        if pt.quality is Quality.BAD:
            t.pop(f"oc.{m}", None)
            add(Condition(f"motor.{m}.over_current", True,
                          f"Motor {m}: current input bad: {pt.reason}", Priority.HIGH, True,
                          None, limit))
            continue
        a = float(pt.value)
        over = _delayed(t, f"oc.{m}", a > limit, dt_s, lim.alarm_delay_s)
        add(Condition(f"motor.{m}.over_current", over,
                      f"Motor {m}: over-current {a:.1f} A > {limit:g} A" if over else
                      f"Motor {m}: current within {limit:g} A ({a:.1f} A)",
                      Priority.HIGH, True, a, limit))

    _grid(p, inputs, t, dt_s, add)
    add(Condition("plc.watchdog", bool(watchdog),
                  f"Scan watchdog: {watchdog}" if watchdog else "Scan watchdog: scans on time",
                  Priority.CRITICAL, True))
    add(Condition("plc.window", bool(window), f"Plant window lost: {window}" if window
                  else "Plant window (OPC UA server, records, historian) connected",
                  Priority.HIGH, False))
    uncertain = sorted(n for n, pt in inputs.items() if pt.quality is Quality.UNCERTAIN)
    add(Condition("io.uncertain", bool(uncertain),
                  "Uncertain inputs: " + ", ".join(uncertain) if uncertain
                  else "Every input good or bad again (none uncertain)",
                  Priority.LOW, False, float(len(uncertain))))
    return out, t


def _zone(p: Program, name: str, max_c: float, min_c: float, r: ZoneReading, stuck: bool,
          goal: float | None, reached: bool, working_max_c: float | None, heat_pct: float,
          t: dict[str, float], dt_s: float, add) -> None:
    """The conditions of one zone. A faulty sensor suppresses (by design) the temperature
    alarms it would otherwise decide; deviation alarms are suppressed while there is no goal."""
    lim = p.limits
    Z = f"Zone {name}"
    fault = r.fault or ("stuck sensor (reading unchanged while driven)" if stuck else "")
    pv = None if fault else r.pv
    add(Condition(f"zone.{name}.sensor", bool(fault),
                  f"{Z}: sensor fault: {fault}" if fault else f"{Z}: sensor reading ({pv:.1f} degC)",
                  Priority.HIGH, True, pv))
    blind = f"{Z}: not monitored while the sensor is faulty"

    hi = min(max_c, lim.abs_max_c)
    lo = max(min_c, lim.abs_min_c)
    over = pv is not None and pv > hi
    add(Condition(f"zone.{name}.over_temp", over,
                  blind if pv is None else f"{Z}: over-temperature {pv:.1f} degC > {hi:g} degC"
                  if over else f"{Z}: temperature within {hi:g} degC ({pv:.1f} degC)",
                  Priority.CRITICAL, True, pv, hi, pv is None))
    under = pv is not None and pv < lo
    add(Condition(f"zone.{name}.under_temp", under,
                  blind if pv is None else f"{Z}: under-temperature {pv:.1f} degC < {lo:g} degC"
                  if under else f"{Z}: temperature above {lo:g} degC ({pv:.1f} degC)",
                  Priority.HIGH, True, pv, lo, pv is None))

    dev = abs(pv - goal) if (pv is not None and goal is not None) else None
    watched = dev if reached else None
    warn = _delayed(t, f"dev_w.{name}", watched is not None and watched > lim.warning_k, dt_s,
                    lim.alarm_delay_s)
    err = _delayed(t, f"dev_e.{name}", watched is not None and watched > lim.error_k, dt_s,
                   lim.alarm_delay_s)
    unwatched = blind if pv is None else f"{Z}: deviation not monitored (no set-point)"
    for cid, active, limit, prio, tail in (
            ("deviation_warning", warn, lim.warning_k, Priority.MEDIUM, ""),
            ("deviation_error", err, lim.error_k, Priority.HIGH, "; pouring withheld")):
        if dev is None:
            msg = unwatched
        elif active:
            msg = f"{Z}: deviation {dev:.1f} K > {limit:g} K from the set-point {goal:.1f} degC{tail}"
        elif not reached:
            msg = f"{Z}: deviation watched once at the set-point {goal:.1f} degC ({dev:.1f} K)"
        else:
            msg = f"{Z}: deviation back within {limit:g} K ({dev:.1f} K)"
        add(Condition(f"zone.{name}.{cid}", active, msg, prio, False, dev, limit, dev is None))

    above = working_max_c is not None and pv is not None and pv > working_max_c
    if working_max_c is None:
        msg = f"{Z}: working maximum not watched (not tempered)"
    elif pv is None:
        msg = blind
    elif above:
        msg = f"{Z}: {pv:.1f} degC above the working maximum {working_max_c:g} degC; heater off"
    else:
        msg = f"{Z}: below the working maximum {working_max_c:g} degC ({pv:.1f} degC)"
    add(Condition(f"zone.{name}.above_working_max", above, msg, Priority.HIGH, False, pv,
                  working_max_c, pv is None and working_max_c is not None))

    # heater or element failure: heated at (near) full output without the temperature rising
    kt, kr = f"np.{name}", f"np_ref.{name}"
    driven = pv is not None and heat_pct >= NO_PROGRESS_DRIVE_PCT and not above
    rise = None
    if driven:
        ref = t.get(kr, pv)
        rise = pv - ref
        if rise >= lim.no_progress_k:           # progress: the watch starts again from here
            t[kr], t[kt] = pv, 0.0
        else:
            t[kr], t[kt] = ref, t.get(kt, 0.0) + dt_s
    else:
        t.pop(kt, None)
        t.pop(kr, None)
    watched_s = t.get(kt, 0.0)
    stalled = driven and watched_s >= lim.no_progress_s - TIME_EPS_S
    if pv is None:
        msg = blind
    elif stalled:
        msg = (f"{Z}: no progress: {rise:+.1f} K in {watched_s / 60:.0f} min at "
               f"{heat_pct:.0f} % heating (needs {lim.no_progress_k:g} K); heater or element failure?")
    elif driven:
        msg = f"{Z}: heating progresses ({rise:+.1f} K in {watched_s / 60:.0f} min at full output)"
    else:
        msg = f"{Z}: not heating at full output ({heat_pct:.0f} %)"
    add(Condition(f"zone.{name}.no_progress", stalled, msg, Priority.HIGH, False,
                  rise, lim.no_progress_k, pv is None))


def _grid(p: Program, inputs: ProcessImage, t: dict[str, float], dt_s: float, add) -> None:
    lim = p.limits
    phases = [f"grid_v_l{i}" for i in range(1, (3 if lim.phase_count >= 3 else 1) + 1)]
    pts = [inputs.get_point(n) for n in (*phases, "grid_freq", "current_total")]
    bad_pts = [(n, pt) for n, pt in zip((*phases, "grid_freq", "current_total"), pts)
               if pt.quality is Quality.BAD]
    band = f"{lim.voltage_low_v:.0f}-{lim.voltage_high_v:.0f} V"
    if bad_pts:
        msg = "; ".join(f"{n}: input bad: {pt.reason}" for n, pt in bad_pts)
        for key in ("grid.v", "grid.f", "grid.i"):
            t.pop(key, None)
        # grid.voltage reports the lost monitoring; the others cannot be evaluated
        blind = f"Grid not monitored: {msg}"
        add(Condition("grid.phase_loss", False, blind, Priority.CRITICAL, True, None, None, True))
        add(Condition("grid.voltage", True, f"Grid monitoring unavailable: {msg}", Priority.HIGH, True))
        add(Condition("grid.frequency", False, blind, Priority.HIGH, True, None, None, True))
        add(Condition("grid.current", False, blind, Priority.HIGH, True, None, None, True))
        return
    volts = {n: float(inputs[n].value) for n in phases}
    lowest = min(volts.values())
    loss_v = lim.voltage_low_v / 2
    lost = [n for n, v in volts.items() if v < loss_v]
    add(Condition("grid.phase_loss", bool(lost),
                  f"Phase loss: {', '.join(lost)} below {loss_v:.0f} V" if lost
                  else f"Every phase present (lowest {lowest:.0f} V)",
                  Priority.CRITICAL, True, lowest, loss_v))
    out_of = [f"{n}={v:.0f} V" for n, v in volts.items()
              if not lim.voltage_low_v <= v <= lim.voltage_high_v]
    worst = max(volts.values(), key=lambda v: max(lim.voltage_low_v - v, v - lim.voltage_high_v))
    v_limit = lim.voltage_high_v if worst > lim.voltage_high_v else lim.voltage_low_v
    v_on = _delayed(t, "grid.v", bool(out_of), dt_s, lim.alarm_delay_s)
    add(Condition("grid.voltage", v_on,
                  f"Grid voltage outside {band}: " + ", ".join(out_of) if v_on else
                  f"Grid voltage within {band} (" + ", ".join(f"{v:.0f}" for v in volts.values())
                  + " V)", Priority.HIGH, True, worst, v_limit))
    f = float(inputs["grid_freq"].value)
    f_limit = lim.frequency_hz + (lim.frequency_tol_hz if f >= lim.frequency_hz else -lim.frequency_tol_hz)
    f_on = _delayed(t, "grid.f", abs(f - lim.frequency_hz) > lim.frequency_tol_hz, dt_s,
                    lim.alarm_delay_s)
    tol = f"{lim.frequency_hz:g}+-{lim.frequency_tol_hz:g} Hz"
    add(Condition("grid.frequency", f_on,
                  f"Grid frequency {f:.2f} Hz outside {tol}" if f_on
                  else f"Grid frequency within {tol} ({f:.2f} Hz)",
                  Priority.HIGH, True, f, f_limit))
    a = float(inputs["current_total"].value)
    i_on = _delayed(t, "grid.i", a > lim.current_total_a, dt_s, lim.alarm_delay_s)
    add(Condition("grid.current", i_on,
                  f"Total current {a:.1f} A > {lim.current_total_a:g} A" if i_on
                  else f"Total current within {lim.current_total_a:g} A ({a:.1f} A)",
                  Priority.HIGH, True, a, lim.current_total_a))
