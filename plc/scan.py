"""The scan: one pure function from (program, state, inputs, commands, context) to results.

    result = scan(program, state, inputs, commands, ScanContext(tick, dt_s, now_s, wall_s=...))

Time: ``now_s`` is the scan's time (deadlines, timers, event times); ``wall_s`` is the wall
clock in epoch seconds (the runtime passes its wall clock, tests pass it explicitly; None:
``now_s``), which stamps the alarms so their times survive a restart.

Order within a scan (IEC 61131-3 style read -> logic -> write; the runtime does the I/O):
0. the first scan of a restored state reports the alarm system (event ``alarm_system``);
1. drain the commands (each accepted or refused with a reason and a status code name, see
   ``sequencer``);
2. read the zone sensors and evaluate the interlocks (``interlocks``); update the alarms
   (ISA-18.2, ``alarms``); latch trips and record the first-out;
3. a latched trip puts the sequence into Fault; the outputs of this very scan are safe;
4. otherwise advance the sequence and run one PID per zone (with the feed-forward of a moving
   phase goal), split into heater and cooling duties, time-proportioned into on/off outputs; a
   zone under autotune takes the experiment's output instead (``plc.autotune``), its PID
   tracking it;
5. return the output image, the new state, the events and a view of the zones.

No clock, no I/O, no randomness: the same arguments always give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from . import alarms as alarm_mod
from . import autotune as tune_mod
from . import interlocks, sequencer
from .commands import Command, Event
from .image import Point, ProcessImage, Quality
from .pid import PidState, PwmState, pid_update, pwm_step, split_range
from .contract import OUTPUT_SPECS, SAFE_OUTPUTS
from .program import Program
from .state import RUNNING, Phase, PlcState, ZoneState


@dataclass(frozen=True, slots=True)
class ScanContext:
    tick: int
    dt_s: float
    now_s: float
    watchdog: str = ""   # non-empty: the runtime's watchdog fired, with the reason
    window: str = ""     # non-empty: the plant window (OPC UA, records, historian) is lost, why
    wall_s: float | None = None   # wall clock, epoch s (alarm times); None: now_s

    @property
    def wall(self) -> float:
        return self.now_s if self.wall_s is None else self.wall_s


@dataclass(frozen=True, slots=True)
class ZoneView:
    name: str
    pv_c: float | None
    sp_c: float | None
    output_pct: float
    quality: Quality
    manual: bool


@dataclass(frozen=True, slots=True)
class ScanResult:
    outputs: ProcessImage
    state: PlcState
    events: tuple[Event, ...]
    zones: tuple[ZoneView, ...]
    demands: sequencer.Demands


def scan(p: Program, s: PlcState, inputs: ProcessImage, commands: Iterable[Command],
         ctx: ScanContext) -> ScanResult:
    dt, now, wall = ctx.dt_s, ctx.now_s, ctx.wall
    events: list[Event] = []
    if s.restarted:
        events.append(sequencer.alarm_system_event(s, wall))
    for cmd in commands:
        s, ev = sequencer.apply_command(p, s, cmd, now, wall)
        events += ev

    # --- sensors and interlocks ----------------------------------------------------------------
    readings = {z.name: interlocks.read_zone(p, inputs, z.name) for z in p.zones}
    zones = dict(s.zones)
    stuck: dict[str, bool] = {}
    for z in p.zones:
        zs = zones.get(z.name) or ZoneState()
        v = readings[z.name].pv
        driven = abs(zs.pid.output) > interlocks.STUCK_DRIVE_PCT and s.phase in RUNNING
        unchanged = zs.unchanged_s + dt if (v is not None and v == zs.last_reading and driven) else 0.0
        zones[z.name] = replace(zs, last_reading=v, unchanged_s=unchanged)
        stuck[z.name] = unchanged >= p.limits.stuck_s
    s = replace(s, zones=zones)
    sps = sequencer.setpoints(p, s)
    recipe = p.recipes.get(s.recipe_id) if s.recipe_id else None
    working_max = recipe.working_max_c if (recipe and s.tempered and s.phase in RUNNING) else None
    running = s.phase in RUNNING and not s.trips
    heat = {n: max(0.0, min(zs.pid.output, 100.0)) if running else 0.0 for n, zs in zones.items()}
    conditions, timers = interlocks.evaluate(
        p, inputs, readings, stuck, sps, {n: zones[n].reached for n in zones}, working_max,
        ctx.watchdog, s.timers, dt, ctx.window, heat)
    new_alarms, changes = alarm_mod.update(s.alarms, conditions, wall)
    events += [sequencer.alarm_event(c, s) for c in changes]
    trips = set(s.trips)
    first_out = s.first_out
    for c in conditions:
        if c.trip and c.active and c.id not in trips:
            if not trips and first_out is None:
                first_out = c.id
            trips.add(c.id)
            events.append(Event("trip", now, f"trip {c.id}: {c.message}",
                                (("alarm_id", c.id), ("first_out", first_out == c.id),
                                 ("batch_id", s.batch_id))))
    s = replace(s, alarms=new_alarms, timers=timers, trips=frozenset(trips), first_out=first_out,
                restarted=False)
    if s.trips and s.phase is not Phase.FAULT:
        s, ev = sequencer.end_batch(s, Phase.FAULT, now, f"fault: {first_out}")
        events += ev

    # --- sequence and control -----------------------------------------------------------------
    active = {c.id for c in conditions if c.active}
    pv = {n: (None if (r.pv is None or stuck[n]) else r.pv) for n, r in readings.items()}
    demands = sequencer.IDLE_DEMANDS
    if s.phase in RUNNING and not s.trips:
        pedal_pt = inputs.get_point("pedal")
        pedal = bool(pedal_pt.value) if pedal_pt.good else None
        dev_err = any(f"zone.{z.name}.deviation_error" in active for z in p.zones)
        s, demands, ev = sequencer.step(p, s, pv, pedal, dev_err, dt, now)
        events += ev
    sps = sequencer.setpoints(p, s)

    duties: dict[str, float] = {}
    rate = sequencer.goal_rate_k_per_s(p, s)
    forced_off: set[str] = set()     # off in this very scan, whatever the PWM window says
    zones = dict(s.zones)
    views = []
    for z in p.zones:
        zs = zones[z.name]
        manual = s.manual.get(z.name)
        controlled = demands.control and demands.heaters_enabled and sps[z.name] is not None
        if controlled:
            tuning = replace(z.tuning, **sequencer.gains_of(p, s, z.name)) \
                if z.name in s.tuning else z.tuning
            u, pid = pid_update(tuning, zs.pid, sps[z.name], pv[z.name], dt, manual,
                                _feed_forward(s, z.name, rate))
        else:
            u, pid = 0.0, PidState(manual=manual is not None)
        x = s.autotune
        if x is not None and x.zone == z.name:
            stop = _autotune_stop(s, z.name, controlled)
            x2, imposed = tune_mod.step(
                x, p.autotune, now_s=now, dt_s=dt, sp=sps[z.name], pv=pv[z.name],
                u_pid=max(z.out_min_pct, u),
                out_min=z.out_min_pct, out_max=z.tuning.out_max, max_temp_c=z.max_temp_c,
                stop=stop)
            if isinstance(x2, tune_mod.Outcome):
                s, ev = sequencer.end_autotune(p, s, x2)
                events += ev
            else:
                s = replace(s, autotune=x2)
            if imposed is not None:  # the PID tracks what the experiment drives: bumpless after
                u, pid = pid_update(tuning, zs.pid, sps[z.name], pv[z.name], dt, imposed)
                pid = replace(pid, manual=False)
        zones[z.name] = replace(zs, pid=pid)
        split = split_range(u, z.fc_threshold_pct)
        if f"zone.{z.name}.above_working_max" in active:
            forced_off.update(z.heating_outputs)
        for name in z.heating_outputs:
            duties[name] = split.heat
        for name in z.cool1_outputs:
            duties[name] = split.cool1
        for name in z.cool2_outputs:
            duties[name] = split.cool2
        views.append(ZoneView(z.name, readings[z.name].pv, sps[z.name], u,
                              inputs.get_point(f"temp_{z.name}").quality if pv[z.name] is not None
                              else Quality.BAD, manual is not None))

    # --- outputs ------------------------------------------------------------------------------
    values = dict(SAFE_OUTPUTS)
    pwm = dict(s.pwm)
    if demands.control:
        for name, duty in duties.items():
            values[name], pwm[name] = pwm_step(pwm.get(name) or _PWM0, duty, p.pwm_window_ticks)
        for name in forced_off:
            values[name], pwm[name] = False, _PWM0
        values.update(mixer=demands.mixer, pump=demands.pump, vibration=demands.vibration,
                      vib_heater=demands.vib_heater, mold_heater=demands.mold_heater)
    else:
        pwm = {}
    s = replace(s, zones=zones, pwm=pwm)
    outputs = ProcessImage({n: Point(v, Quality.GOOD, now) for n, v in values.items()})
    return ScanResult(outputs, s, tuple(events), tuple(views), demands)


_PWM0 = PwmState()


def _feed_forward(s: PlcState, zone: str, rate_k_per_s: float) -> float:
    """The output (%) a moving phase goal asks of a zone: the rate over the zone's slope per %
    (K/(%*s), from the model its accepted autotune identified; none without a model)."""
    if rate_k_per_s == 0.0:
        return 0.0
    g = s.tuning.get(zone)
    if not g or "model_gain_k_per_pct" not in g or g.get("model_tau_s", 0.0) <= 0.0:
        return 0.0
    slope = g["model_gain_k_per_pct"] / g["model_tau_s"]
    return rate_k_per_s / slope if slope > 0 else 0.0


def _autotune_stop(s: PlcState, zone: str, controlled: bool) -> str:
    """Why the running autotune must end now ('' if it may go on)."""
    if s.phase is not Phase.HEATING or s.tempered:
        return f"the batch left heating (phase {s.phase.value})"
    if s.trips:
        return f"a trip latched ({s.first_out})"
    if s.interrupted:
        return "the batch was interrupted"
    if zone in s.manual:
        return "the zone was put in manual"
    if not controlled:
        return "the zone's loop is not active"
    return ""
