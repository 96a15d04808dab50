"""Safety interlocks: from the input image to conditions (alarm ids, active, trip or not).

Pure. Evaluated every scan before the sequence. A *trip* condition latches (see ``scan.py``):
outputs go to their safe state in the same scan, the first trip is recorded as first-out, and
only an explicit reset clears it once the condition is gone.

Condition ids and what raises them:
    estop                        e-stop chain open, or its input not good            trip
    zone.<z>.sensor              input bad, NaN, above the plausibility limit (open),
                                 below it (short), or unchanged for ``stuck_s`` while
                                 the zone is driven hard (stuck)                     trip
    zone.<z>.over_temp           above min(zone max_temp, abs_max_heat)              trip
    zone.<z>.under_temp          below max(zone min_temp, abs_min_heat)              trip
    zone.<z>.deviation_warning   |pv - goal| > warning_limit once at goal (delayed)  alarm
    zone.<z>.deviation_error     |pv - goal| > error_limit once at goal (delayed);
                                 pouring is withheld while active                    alarm
    zone.<z>.above_working_max   tempered and above the recipe's working maximum;
                                 the zone's heater is forced off                     alarm
    motor.<m>.over_current       above its limit for alarm_delay_s, or input bad     trip
    grid.current                 highest phase current above the limit (delayed)     trip
    grid.phase_loss              a monitored phase below half its low limit          trip
    grid.voltage                 a phase outside the voltage limits (delayed)        trip
    grid.frequency               frequency outside nominal +- tolerance (delayed)    trip
    plc.watchdog                 the runtime's scan watchdog fired                   trip
    plc.window                   the plant window (OPC UA server, records, historian)
                                 is gone or silent; the PLC goes on controlling      alarm
    io.uncertain                 an input has uncertain quality (stale)              alarm
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
                   "above_working_max")
GRID_CONDITIONS = ("current", "phase_loss", "voltage", "frequency")


def condition_ids(p: Program) -> tuple[str, ...]:
    """Every condition id ``evaluate`` can raise for this program (the list in the docstring):
    what an alarm list (OPC UA Alarms folder) has one entry for."""
    return ("estop",
            *(f"zone.{z.name}.{c}" for z in p.zones for c in ZONE_CONDITIONS),
            *(f"motor.{m}.over_current" for m in MOTORS),
            *(f"grid.{c}" for c in GRID_CONDITIONS),
            "plc.watchdog", "plc.window", "io.uncertain")


STUCK_DRIVE_PCT = 50.0
TIME_EPS_S = 1e-6  # timers sum dt in floating point: 20 x 0.1 s must count as 2 s  # a zone driven harder than this must show its reading move


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
             dt_s: float, window: str = "") -> tuple[list[Condition], dict[str, float]]:
    lim = p.limits
    t = dict(timers)
    out: list[Condition] = []
    add = out.append

    est = inputs.get_point("estop_ok")
    if est.quality is not Quality.GOOD:
        add(Condition("estop", True, f"E-stop input not good: {est.reason}", Priority.CRITICAL, True))
    else:
        add(Condition("estop", not bool(est.value), "E-stop pressed (chain open)",
                      Priority.CRITICAL, True))

    for z in p.zones:
        r = readings[z.name]
        fault = r.fault or ("stuck sensor (reading unchanged while driven)" if stuck[z.name] else "")
        add(Condition(f"zone.{z.name}.sensor", bool(fault),
                      f"Zone {z.name}: sensor fault: {fault}" if fault else f"Zone {z.name}: sensor",
                      Priority.HIGH, True))
        pv = None if fault else r.pv
        hi = min(z.max_temp_c, lim.abs_max_c)
        lo = max(z.min_temp_c, lim.abs_min_c)
        add(Condition(f"zone.{z.name}.over_temp", pv is not None and pv > hi,
                      f"Zone {z.name}: over-temperature ({pv} > {hi} degC)", Priority.CRITICAL,
                      True, pv))
        add(Condition(f"zone.{z.name}.under_temp", pv is not None and pv < lo,
                      f"Zone {z.name}: under-temperature ({pv} < {lo} degC)", Priority.HIGH,
                      True, pv))
        goal = goals.get(z.name)
        dev = abs(pv - goal) if (pv is not None and goal is not None and reached[z.name]) else 0.0
        warn = _delayed(t, f"dev_w.{z.name}", dev > lim.warning_k, dt_s, lim.alarm_delay_s)
        err = _delayed(t, f"dev_e.{z.name}", dev > lim.error_k, dt_s, lim.alarm_delay_s)
        add(Condition(f"zone.{z.name}.deviation_warning", warn,
                      f"Zone {z.name}: deviation {dev:.1f} K > {lim.warning_k} K", Priority.MEDIUM,
                      False, dev))
        add(Condition(f"zone.{z.name}.deviation_error", err,
                      f"Zone {z.name}: deviation {dev:.1f} K > {lim.error_k} K; pouring withheld",
                      Priority.HIGH, False, dev))
        above = working_max_c is not None and pv is not None and pv > working_max_c
        add(Condition(f"zone.{z.name}.above_working_max", above,
                      f"Zone {z.name}: {pv} degC above the working maximum {working_max_c} degC; "
                      "heater off", Priority.HIGH, False, pv))

    for m in MOTORS:
        limit = lim.motor_current_a[m]
        if limit <= 0:
            continue
        pt = inputs.get_point(f"current_{m}")
        if pt.quality is Quality.BAD:
            add(Condition(f"motor.{m}.over_current", True,
                          f"Motor {m}: current input bad: {pt.reason}", Priority.HIGH, True))
            continue
        a = float(pt.value)
        over = _delayed(t, f"oc.{m}", a > limit, dt_s, lim.alarm_delay_s)
        add(Condition(f"motor.{m}.over_current", over,
                      f"Motor {m}: over-current {a:.1f} A > {limit} A", Priority.HIGH, True, a))

    _grid(p, inputs, t, dt_s, add)
    add(Condition("plc.watchdog", bool(watchdog), f"Scan watchdog: {watchdog}",
                  Priority.CRITICAL, True))
    add(Condition("plc.window", bool(window), f"Plant window lost: {window}" if window
                  else "Plant window (OPC UA server, records, historian)", Priority.HIGH, False))
    uncertain = sorted(n for n, pt in inputs.items() if pt.quality is Quality.UNCERTAIN)
    add(Condition("io.uncertain", bool(uncertain),
                  "Uncertain inputs: " + ", ".join(uncertain), Priority.LOW, False))
    return out, t


def _grid(p: Program, inputs: ProcessImage, t: dict[str, float], dt_s: float, add) -> None:
    lim = p.limits
    phases = [f"grid_v_l{i}" for i in range(1, (3 if lim.phase_count >= 3 else 1) + 1)]
    pts = [inputs.get_point(n) for n in (*phases, "grid_freq", "current_total")]
    bad_pts = [(n, pt) for n, pt in zip((*phases, "grid_freq", "current_total"), pts)
               if pt.quality is Quality.BAD]
    if bad_pts:
        msg = "; ".join(f"{n}: input bad: {pt.reason}" for n, pt in bad_pts)
        add(Condition("grid.voltage", True, f"Grid monitoring unavailable: {msg}", Priority.HIGH, True))
        return
    volts = {n: float(inputs[n].value) for n in phases}
    lost = [n for n, v in volts.items() if v < lim.voltage_low_v / 2]
    add(Condition("grid.phase_loss", bool(lost), "Phase loss: " + ", ".join(lost),
                  Priority.CRITICAL, True))
    out_of = [f"{n}={v:.0f} V" for n, v in volts.items()
              if not lim.voltage_low_v <= v <= lim.voltage_high_v]
    add(Condition("grid.voltage", _delayed(t, "grid.v", bool(out_of), dt_s, lim.alarm_delay_s),
                  f"Grid voltage outside {lim.voltage_low_v:.0f}-{lim.voltage_high_v:.0f} V: "
                  + ", ".join(out_of), Priority.HIGH, True))
    f = float(inputs["grid_freq"].value)
    add(Condition("grid.frequency", _delayed(t, "grid.f", abs(f - lim.frequency_hz) > lim.frequency_tol_hz,
                                             dt_s, lim.alarm_delay_s),
                  f"Grid frequency {f:.2f} Hz outside {lim.frequency_hz}+-{lim.frequency_tol_hz} Hz",
                  Priority.HIGH, True, f))
    a = float(inputs["current_total"].value)
    add(Condition("grid.current", _delayed(t, "grid.i", a > lim.current_total_a, dt_s, lim.alarm_delay_s),
                  f"Total current {a:.1f} A > {lim.current_total_a} A", Priority.HIGH, True, a))
