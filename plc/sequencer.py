"""The tempering sequence: commands, phases and what each phase asks of the machine. Pure.

    Idle --Start--> Heating --at heating goal for heating_delay--> Cooling
    Cooling --tank at cooling goal for cooling_delay--> Pouring (tempered)
    Pouring --at pouring goal for pouring_delay--> pouring released (fountain / pedal)
    Pouring --Stop--> Stopped           any running phase --Abort--> Stopped
    Heating/Cooling/Pouring --Hold--> held (timers stop, temperatures held, no pouring) --Resume-->
    any phase --trip--> Fault --Reset (conditions gone)--> Idle      (never restarts heating)
    restart while running --> interrupted (outputs safe) --Resume / Abort-->

``check_command`` holds the rules of which command is allowed in which state; anything else is
refused with the reason. Motor sequencing (seed delays, see ``program.py``): the mixer runs
``mixer_delay`` before the heaters are enabled; the pump runs only once the pump zone has been
above its start temperature for ``pump_delay`` and stops at once below ``pump_min_heat``;
fountain, vibration and the heaters of the table and molds follow the recipe's flags.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Mapping

from . import alarms as alarm_mod
from . import autotune as tune_mod
from .commands import (AMPLITUDE_PCT, MAX_GAIN, MAX_TRIM_K, Abort, AbortAutotune, AcceptTuning,
                       Acknowledge, AddComment, Command, Confirm, Event, Hold, RejectTuning, Reset,
                       Resume, SetAlarmEnabled, SetManual, SetTrim, SetTuning, Shelve, Shutdown,
                       StartAutotune, StartRecipe, Stop, Unshelve)
from .interlocks import TIME_EPS_S
from .pid import reset as pid_reset
from .pid import retune
from .contract import TANK_ZONES
from .program import Program, RecipeProgram
from .state import RUNNING, Phase, PlcState, ZoneState


@dataclass(frozen=True, slots=True)
class Demands:
    """What the sequence asks of the machine this scan (before interlocks)."""
    control: bool = False          # zone loops active
    heaters_enabled: bool = False
    mixer: bool = False
    pump: bool = False
    vibration: bool = False
    vib_heater: bool = False
    mold_heater: bool = False


IDLE_DEMANDS = Demands()


ALARM_COMMANDS = (Acknowledge, Confirm, AddComment, Shelve, Unshelve, SetAlarmEnabled)


def alarm_change(p: Program, s: PlcState, cmd: Command,
                 wall_s: float) -> alarm_mod.Change | alarm_mod.Refusal:
    """An alarm command (one of ``ALARM_COMMANDS``) applied to the alarms at wall time
    ``wall_s``: the new alarms and their transitions, or the refusal with its status code."""
    a, u = s.alarms, cmd.user
    if isinstance(cmd, Acknowledge):
        return alarm_mod.acknowledge(a, cmd.alarm_id, u, wall_s, cmd.comment, cmd.event_id)
    if isinstance(cmd, Confirm):
        return alarm_mod.confirm(a, cmd.alarm_id, u, wall_s, cmd.comment, cmd.event_id)
    if isinstance(cmd, AddComment):
        return alarm_mod.add_comment(a, cmd.alarm_id, u, wall_s, cmd.comment, cmd.event_id)
    if isinstance(cmd, Shelve):
        return alarm_mod.shelve(a, cmd.alarm_id, cmd.duration_s, u, wall_s,
                                p.limits.max_shelve_s, cmd.comment)
    if isinstance(cmd, Unshelve):
        return alarm_mod.unshelve(a, cmd.alarm_id, u, wall_s, cmd.comment)
    if isinstance(cmd, SetAlarmEnabled):
        return alarm_mod.set_enabled(a, cmd.alarm_id, bool(cmd.enabled), u, wall_s, cmd.comment)
    raise TypeError(f"not an alarm command: {cmd.name}")


def refusal(p: Program, s: PlcState, cmd: Command) -> alarm_mod.Refusal | None:
    """None if ``cmd`` is allowed in state ``s``, else why not, with its status code name."""
    if isinstance(cmd, ALARM_COMMANDS):
        r = alarm_change(p, s, cmd, 0.0)       # the checks do not depend on the time
        return r if isinstance(r, alarm_mod.Refusal) else None
    why = check_command(p, s, cmd)
    return alarm_mod.Refusal("BadInvalidState", why) if why else None


def check_command(p: Program, s: PlcState, cmd: Command) -> str:
    """'' if ``cmd`` is allowed in state ``s``, else the reason it is refused."""
    if isinstance(cmd, ALARM_COMMANDS):
        r = refusal(p, s, cmd)
        return r.reason if r else ""
    running = s.phase in RUNNING
    if isinstance(cmd, StartRecipe):
        if cmd.recipe_id not in p.recipes:
            return f"unknown recipe {cmd.recipe_id!r} (known: {', '.join(sorted(p.recipes))})"
        if s.trips:
            return "a trip is latched (first-out: %s); reset first" % s.first_out
        if s.phase not in (Phase.IDLE, Phase.STOPPED):
            return f"a batch is {s.phase.value}; stop or abort it first"
        return ""
    if isinstance(cmd, Hold):
        if not running:
            return f"nothing to hold in phase {s.phase.value}"
        if s.held or s.interrupted:
            return "already held" if s.held else "the batch is interrupted; resume or abort it"
        return ""
    if isinstance(cmd, Resume):
        if not running or not (s.held or s.interrupted):
            return "nothing to resume (not held or interrupted)"
        if s.trips:
            return "a trip is latched; reset first"
        return ""
    if isinstance(cmd, Stop):
        return "" if s.phase is Phase.POURING else (
            f"stop ends pouring; in phase {s.phase.value} use abort")
    if isinstance(cmd, Abort):
        return "" if running else f"no running batch to abort (phase {s.phase.value})"
    if isinstance(cmd, Reset):
        if not s.trips:
            return "no trip is latched"
        # the raw conditions (shelving and disable do not matter); a trip restored after a
        # restart is not evaluated before the first scan's commands: not known clear, so active
        active = sorted(t for t in s.trips
                        if s.restarted or t not in s.alarms or s.alarms[t].active)
        return f"conditions still active: {', '.join(active)}" if active else ""
    if isinstance(cmd, (SetManual, SetTrim, SetTuning)):
        if cmd.zone not in {z.name for z in p.zones}:
            return f"unknown zone {cmd.zone!r}"
        if isinstance(cmd, SetTuning):
            for gain in ("kp", "ki", "kd"):
                v = getattr(cmd, gain)
                if v is not None and not (math.isfinite(v) and 0.0 <= v <= MAX_GAIN):
                    return f"{gain} must be within 0..{MAX_GAIN:g} (got {v})"
        if isinstance(cmd, SetManual) and cmd.output_pct is not None and not (
                -100.0 <= cmd.output_pct <= 100.0):
            return f"output must be within -100..100 % (got {cmd.output_pct})"
        if isinstance(cmd, SetTrim) and not -MAX_TRIM_K <= cmd.trim_k <= MAX_TRIM_K:
            return f"trim must be within -{MAX_TRIM_K}..{MAX_TRIM_K} K (got {cmd.trim_k})"
        return ""
    if isinstance(cmd, (StartAutotune, AcceptTuning, RejectTuning)) or (
            isinstance(cmd, AbortAutotune) and cmd.zone is not None):
        if cmd.zone not in {z.name for z in p.zones}:
            return f"unknown zone {cmd.zone!r}"
    if isinstance(cmd, StartAutotune):
        x = s.autotune
        if x is not None:
            return f"an autotune of zone {x.zone} is running; abort it first"
        if s.phase is not Phase.HEATING or s.tempered:
            return (f"an autotune runs only while a batch is heating (before tempering); in phase "
                    f"{s.phase.value} it would spoil the batch")
        if s.interrupted:
            return "the batch is interrupted; resume it first"
        if s.trips:
            return "a trip is latched (first-out: %s); reset first" % s.first_out
        if cmd.zone in s.manual:
            return f"zone {cmd.zone} is in manual; put it in auto first"
        recipe = p.recipes[s.recipe_id]
        if recipe.mixer and s.mixer_run_s < p.sequence.mixer_delay_s - TIME_EPS_S:
            return "the heaters are not enabled yet (the mixer runs its delay first)"
        amp = cmd.amplitude_pct
        lo, hi = AMPLITUDE_PCT
        if amp is not None and not (math.isfinite(amp) and lo <= amp <= hi):
            return f"amplitude must be within {lo:g}..{hi:g} % (got {amp})"
        return ""
    if isinstance(cmd, AbortAutotune):
        x = s.autotune
        if x is None or (cmd.zone is not None and x.zone != cmd.zone):
            return "no autotune is running" + (f" on zone {cmd.zone}" if cmd.zone else "")
        return ""
    if isinstance(cmd, (AcceptTuning, RejectTuning)):
        o = s.autotune_outcomes.get(cmd.zone)
        if o is None or o.status != tune_mod.PROPOSED:
            return f"zone {cmd.zone} has no autotune proposal" + (
                f" (its last autotune: {o.status})" if o else "")
        return ""
    if isinstance(cmd, Shutdown):
        return ""
    return f"unknown command {cmd.name}"


def _phase(s: PlcState, phase: Phase, now_s: float, why: str) -> tuple[PlcState, list[Event]]:
    ev = [Event("phase", now_s, f"{s.phase.value} -> {phase.value}: {why}",
                (("from", s.phase.value), ("to", phase.value), ("batch_id", s.batch_id)))]
    zones = {n: replace(z, reached=False) for n, z in s.zones.items()}
    return replace(s, phase=phase, phase_time_s=0.0, dwell_s=0.0, zones=zones,
                   pouring_released=False, pedal_cycle_s=0.0), ev


def end_batch(s: PlcState, phase: Phase, now_s: float, outcome: str) -> tuple[PlcState, list[Event]]:
    s2, ev = _phase(s, phase, now_s, outcome)
    if s.phase in RUNNING:
        ev.append(Event("batch_end", now_s, f"batch {s.batch_id} {outcome}",
                        (("batch_id", s.batch_id), ("recipe_id", s.recipe_id), ("outcome", outcome))))
    return replace(s2, held=False, interrupted=False, pump_ready=False, pump_warm_s=0.0), ev


def with_batch_floor(s: PlcState, floor: int) -> PlcState:
    """``s`` with its batch count raised to ``floor`` (the highest batch number the records
    know) if it is below: the next batch is numbered ``floor + 1`` at least, so a PLC whose state
    file is new (a restored or migrated machine) does not reuse the ids of its history. The count
    never goes down; the running batch keeps its id."""
    return replace(s, batch_seq=floor) if floor > s.batch_seq else s


def apply_command(p: Program, s: PlcState, cmd: Command, now_s: float,
                  wall_s: float | None = None) -> tuple[PlcState, list[Event]]:
    """Check and apply one command; ``wall_s`` (epoch s, default ``now_s``) stamps alarms."""
    wall = now_s if wall_s is None else wall_s
    data = (("command", cmd.name), ("user", cmd.user), ("command_id", cmd.id), ("origin", cmd.origin))
    change = alarm_change(p, s, cmd, wall) if isinstance(cmd, ALARM_COMMANDS) else None
    refused = change if isinstance(change, alarm_mod.Refusal) else (
        None if change is not None else refusal(p, s, cmd))
    if refused is not None:
        return s, [Event("command_refused", now_s, f"{cmd.name} refused: {refused.reason}",
                         data + (("reason", refused.reason), ("code", refused.code)))]
    ev: list[Event] = [Event("command_accepted", now_s, f"{cmd.name} by {cmd.user or '?'}", data)]
    if change is not None:
        new_alarms, changes = change
        s = replace(s, alarms=new_alarms)
        ev += [alarm_event(c, s) for c in changes]
    elif isinstance(cmd, StartRecipe):
        seq = s.batch_seq + 1              # batch_seq: max(own count, the records' floor)
        batch = f"{p.machine_id}-{seq:06d}"
        s = replace(s, recipe_id=cmd.recipe_id, batch_id=batch, batch_seq=seq, tempered=False,
                    held=False, interrupted=False, mixer_run_s=0.0, pump_warm_s=0.0,
                    pump_ready=False, zones={n: ZoneState(pid=pid_reset(z.pid))
                                             for n, z in s.zones.items()})
        s, e = _phase(s, Phase.HEATING, now_s, f"recipe {cmd.recipe_id} started by {cmd.user or '?'}")
        ev += e
        ev.append(Event("batch_start", now_s, f"batch {batch} recipe {cmd.recipe_id}",
                        (("batch_id", batch), ("recipe_id", cmd.recipe_id), ("user", cmd.user))))
    elif isinstance(cmd, Hold):
        s = replace(s, held=True)
    elif isinstance(cmd, Resume):
        if s.interrupted:  # after a restart: re-run the mixer delay and pump checks from scratch
            s = replace(s, mixer_run_s=0.0, pump_warm_s=0.0, pump_ready=False)
        s = replace(s, held=False, interrupted=False)
    elif isinstance(cmd, Stop):
        s, e = end_batch(s, Phase.STOPPED, now_s, "completed")
        ev += e
    elif isinstance(cmd, (Abort, Shutdown)):
        if s.phase in RUNNING:
            s, e = end_batch(s, Phase.STOPPED, now_s, "aborted" if isinstance(cmd, Abort) else "shutdown")
            ev += e
    elif isinstance(cmd, Reset):
        s = replace(s, trips=frozenset(), first_out=None)
        if s.phase is Phase.FAULT:
            s, e = _phase(s, Phase.IDLE, now_s, f"reset by {cmd.user or '?'}")
            ev += e
    elif isinstance(cmd, SetManual):
        manual = dict(s.manual)
        if cmd.output_pct is None:
            manual.pop(cmd.zone, None)
        else:
            manual[cmd.zone] = float(cmd.output_pct)
        s = replace(s, manual=manual)
    elif isinstance(cmd, SetTrim):
        s = replace(s, trims={**s.trims, cmd.zone: float(cmd.trim_k)})
    elif isinstance(cmd, SetTuning):
        gains = dict(s.tuning.get(cmd.zone, {}))
        gains.update({g: float(v) for g in ("kp", "ki", "kd") if (v := getattr(cmd, g)) is not None})
        s = _retuned(p, s, cmd.zone, gains)
    elif isinstance(cmd, StartAutotune):
        amp = p.autotune.amplitude_pct if cmd.amplitude_pct is None else float(cmd.amplitude_pct)
        s = replace(s, autotune=tune_mod.start(cmd.zone, cmd.user, now_s, amp))
        ev.append(autotune_event(now_s, cmd.zone, "started", f"zone {cmd.zone}: autotune started "
                                 f"by {cmd.user or '?'} (amplitude {amp:g} %)", cmd.user))
    elif isinstance(cmd, AbortAutotune):
        s, e = end_autotune(p, s, tune_mod.Outcome(s.autotune.zone, tune_mod.ABORTED,
                                                   f"aborted by {cmd.user or '?'}", now_s, cmd.user))
        ev += e
    elif isinstance(cmd, AcceptTuning):
        o = s.autotune_outcomes[cmd.zone]
        m, g = o.model, o.gains
        gains = {**s.tuning.get(cmd.zone, {}), "kp": g.kp, "ki": g.ki, "kd": g.kd,
                 "d_filter_s": g.d_filter_s, "model_gain_k_per_pct": m.gain_k_per_pct,
                 "model_tau_s": m.tau_s, "model_dead_s": m.dead_s}
        s = replace(_retuned(p, s, cmd.zone, gains), autotune_outcomes={
            **s.autotune_outcomes, cmd.zone: replace(o, status=tune_mod.ACCEPTED)})
        ev.append(autotune_event(now_s, cmd.zone, tune_mod.ACCEPTED,
                                 f"zone {cmd.zone}: tuning accepted by {cmd.user or '?'}: kp "
                                 f"{g.kp:.4g} (was {o.previous.get('kp', 0):.4g}), ki {g.ki:.4g} "
                                 f"(was {o.previous.get('ki', 0):.4g})", cmd.user))
    elif isinstance(cmd, RejectTuning):
        o = s.autotune_outcomes[cmd.zone]
        s = replace(s, autotune_outcomes={**s.autotune_outcomes,
                                          cmd.zone: replace(o, status=tune_mod.REJECTED)})
        ev.append(autotune_event(now_s, cmd.zone, tune_mod.REJECTED,
                                 f"zone {cmd.zone}: tuning proposal rejected by {cmd.user or '?'}",
                                 cmd.user))
    return s, ev


def _retuned(p: Program, s: PlcState, zone: str, tuning: dict[str, float]) -> PlcState:
    """``s`` with a zone's run-time tuning replaced, bumpless: the zone's PID state is moved so
    that the new gains give the output the old ones gave."""
    old = replace(p.zone(zone).tuning, **gains_of(p, s, zone))
    s = replace(s, tuning={**s.tuning, zone: tuning})
    new = replace(p.zone(zone).tuning, **gains_of(p, s, zone))
    zs = s.zones.get(zone)
    if zs is None:
        return s
    return replace(s, zones={**s.zones, zone: replace(zs, pid=retune(zs.pid, old, new))})


def gains_of(p: Program, s: PlcState, zone: str) -> dict[str, float]:
    """The PID gains a zone runs with now: the configured ones, changed at run time."""
    z = p.zone(zone)
    g = s.tuning.get(zone, {})
    return {k: float(g.get(k, getattr(z.tuning, k))) for k in ("kp", "ki", "kd", "d_filter_s")}


def autotune_event(now_s: float, zone: str, status: str, message: str, user: str = "") -> Event:
    """Kind ``autotune``: data zone, status (started | proposed | accepted | rejected | aborted |
    failed), user."""
    return Event("autotune", now_s, message, (("zone", zone), ("status", status), ("user", user)))


def end_autotune(p: Program, s: PlcState, o: "tune_mod.Outcome") -> tuple[PlcState, list[Event]]:
    """The running experiment ends with ``o``: kept as the zone's last outcome, with the gains
    the zone had (what a proposal would replace)."""
    o = replace(o, previous=gains_of(p, s, o.zone))
    s = replace(s, autotune=None, autotune_outcomes={**s.autotune_outcomes, o.zone: o})
    return s, [autotune_event(o.time_s, o.zone, o.status, f"zone {o.zone}: autotune {o.status}: "
                              f"{o.message}", o.user)]


def alarm_event(c: alarm_mod.AlarmTransition, s: PlcState) -> Event:
    """The scan event of one alarm transition (kind ``alarm``), at its wall time. Data keys:
    alarm_id, transition (its kind), from, to (AlarmState values), priority (int), user,
    comment, value, batch_id, recipe_id (of the state ``s``), alarm (the Alarm record)."""
    a = c.alarm
    who = f" by {c.user}" if c.user else ""
    note = f" ({c.kind}{who}{': ' + c.comment if c.comment else ''})" if (
        c.kind not in ("active", "cleared", "message")) else ""
    return Event("alarm", c.time, f"{c.id}: {c.old.value} -> {c.new.value}: {a.message}{note}",
                 (("alarm_id", c.id), ("transition", c.kind), ("from", c.old.value),
                  ("to", c.new.value), ("priority", int(a.priority)), ("user", c.user),
                  ("comment", c.comment), ("value", a.value), ("batch_id", s.batch_id),
                  ("recipe_id", s.recipe_id), ("alarm", a)))


def alarm_system_event(s: PlcState, wall_s: float) -> Event:
    """The first scan after a start: what the alarm system came up with (kind
    ``alarm_system``, transition ``restart``)."""
    restored = len(s.alarms)
    unacked = sum(1 for a in s.alarms.values() if a.enabled and not a.acked)
    return Event("alarm_system", wall_s,
                 f"PLC started: {restored} alarms restored, {unacked} unacknowledged",
                 (("transition", "restart"), ("restored", restored), ("unacknowledged", unacked),
                  ("batch_id", s.batch_id), ("recipe_id", s.recipe_id)))


def goal_c(recipe: RecipeProgram, phase: Phase) -> float | None:
    return {Phase.HEATING: recipe.heating_goal_c, Phase.COOLING: recipe.cooling_goal_c,
            Phase.POURING: recipe.pouring_goal_c}.get(phase)


LANDING_S = 30.0            # a moving goal lands on the final one with this time constant
LANDED_K = 0.05             # ... and is final once this close


def _moving(start: float, final: float, rate_k_per_s: float, t_s: float) -> tuple[float, float]:
    """A goal moving from ``start`` to ``final`` at ``rate`` that lands softly: a ramp until
    rate x LANDING_S from the final goal, then an exponential approach with that time constant
    (the rate is continuous, so the zones' feed-forward fades instead of stopping). Returns
    (goal, its rate K/s, signed)."""
    span = abs(final - start)
    sign = 1.0 if final > start else -1.0
    land = rate_k_per_s * LANDING_S
    t_ramp = max(0.0, (span - land) / rate_k_per_s)
    if t_s < t_ramp:
        return start + sign * rate_k_per_s * t_s, sign * rate_k_per_s
    left = min(land, span) * math.exp(-(t_s - t_ramp) / LANDING_S)
    return final - sign * left, sign * left / LANDING_S


def phase_goal(p: Program, s: PlcState, recipe: RecipeProgram) -> tuple[float | None, bool]:
    """The goal of the running phase now, and whether it is the phase's final goal: cooling
    and pouring move their goal from the previous phase's at the configured ramp."""
    goal, rate = _phase_goal(p, s, recipe)
    return goal, rate == 0.0


def _phase_goal(p: Program, s: PlcState, recipe: RecipeProgram) -> tuple[float | None, float]:
    goal = goal_c(recipe, s.phase)
    seq = p.sequence
    if s.phase is Phase.COOLING and seq.cooling_ramp_k_per_min > 0:
        start, ramp = recipe.heating_goal_c, seq.cooling_ramp_k_per_min
    elif s.phase is Phase.POURING and seq.reheat_ramp_k_per_min > 0 and not s.pouring_released:
        start, ramp = recipe.cooling_goal_c, seq.reheat_ramp_k_per_min
    else:
        return goal, 0.0
    moving, rate = _moving(start, goal, ramp / 60.0, s.phase_time_s)
    return (moving, rate) if abs(moving - goal) > LANDED_K else (goal, 0.0)


def goal_rate_k_per_s(p: Program, s: PlcState) -> float:
    """How fast the running phase's goal moves now (K/s, signed; 0 once it is final)."""
    recipe = p.recipes.get(s.recipe_id) if s.recipe_id else None
    if recipe is None or s.phase not in RUNNING or s.held:
        return 0.0
    return _phase_goal(p, s, recipe)[1]


def setpoints(p: Program, s: PlcState) -> dict[str, float | None]:
    """Zone set-points of the current phase: goal + offset + operator trim, within ceilings."""
    recipe = p.recipes.get(s.recipe_id) if s.recipe_id else None
    goal = phase_goal(p, s, recipe)[0] if recipe and s.phase in RUNNING else None
    out: dict[str, float | None] = {}
    for z in p.zones:
        if goal is None:
            out[z.name] = None
            continue
        sp = min(goal + z.setpoint_offset_k + s.trims.get(z.name, 0.0), z.setpoint_max_c)
        if s.tempered:  # never aim at or above the working maximum once tempered
            sp = min(sp, recipe.working_max_c - p.sequence.tolerance_k)
        out[z.name] = sp
    return out


def step(p: Program, s: PlcState, pv: Mapping[str, float | None], pedal: bool | None,
         deviation_error: bool, dt_s: float, now_s: float) -> tuple[PlcState, Demands, list[Event]]:
    """Advance a running, untripped sequence by one scan."""
    recipe = p.recipes[s.recipe_id]  # running implies a known recipe
    seq = p.sequence
    if s.interrupted:
        return s, IDLE_DEMANDS, []
    ev: list[Event] = []
    sps = setpoints(p, s)
    final = phase_goal(p, s, recipe)[1]
    # zones at goal; the dwell timer runs while every zone that decides the phase is at goal.
    # A zone has reached its goal (its deviation alarms apply from then on) only at the final
    # one: a zone without cooling trails a moving cooling goal by design
    zones = dict(s.zones)
    for z in p.zones:
        v, sp = pv.get(z.name), sps[z.name]
        at = final and v is not None and sp is not None and abs(v - sp) <= seq.tolerance_k
        zs = zones.get(z.name, ZoneState())
        if at and not zs.reached:
            zones[z.name] = replace(zs, reached=True)
    deciding = TANK_ZONES if s.phase is Phase.COOLING else tuple(z.name for z in p.zones)
    all_at = final and all(pv.get(n) is not None and sps[n] is not None and abs(pv[n] - sps[n]) <= seq.tolerance_k
                 for n in deciding)
    held = s.held or s.autotune is not None     # an autotune holds the sequence's timers
    s = replace(s, zones=zones,
                phase_time_s=s.phase_time_s + (0.0 if held else dt_s),
                dwell_s=(s.dwell_s + dt_s if all_at else 0.0) if not held else s.dwell_s)

    mixer = recipe.mixer
    mixer_run = s.mixer_run_s + dt_s if mixer else s.mixer_run_s
    heaters = (not mixer) or mixer_run >= seq.mixer_delay_s - TIME_EPS_S

    pump_pv = pv.get("pump")
    warm_needed = seq.pump_min_c if s.pump_ready else seq.pump_start_c
    warm_s = s.pump_warm_s + dt_s if (pump_pv is not None and pump_pv >= warm_needed) else 0.0
    pump_ready = warm_s >= seq.pump_delay_s - TIME_EPS_S
    s = replace(s, mixer_run_s=mixer_run, pump_warm_s=warm_s, pump_ready=pump_ready)

    if not held:
        if s.phase is Phase.HEATING and s.dwell_s >= seq.heating_dwell_s - TIME_EPS_S:
            s, e = _phase(s, Phase.COOLING, now_s, "heating goal held")
            ev += e
        elif s.phase is Phase.COOLING and s.dwell_s >= seq.cooling_dwell_s - TIME_EPS_S:
            s, e = _phase(replace(s, tempered=True), Phase.POURING, now_s, "cooling goal held; tempered")
            ev += e
        elif s.phase is Phase.POURING and not s.pouring_released and s.dwell_s >= seq.pouring_dwell_s - TIME_EPS_S:
            s = replace(s, pouring_released=True)
            ev.append(Event("pouring_released", now_s, "pouring goal held; pouring released",
                            (("batch_id", s.batch_id),)))

    pouring = s.phase is Phase.POURING and s.pouring_released and not held and not deviation_error
    pump = False
    if pump_ready:
        if s.phase is not Phase.POURING:
            pump = True                      # circulate while heating and cooling
        elif recipe.fountain:                # the fountain runs, unless held or out of temperature
            pump = not held and not deviation_error
        elif pouring and recipe.pedal_auto:
            cycle = recipe.pedal_on_s + recipe.pedal_off_s
            pump = (s.pedal_cycle_s % cycle) < recipe.pedal_on_s
        elif pouring:
            pump = bool(pedal)
    if pouring:
        s = replace(s, pedal_cycle_s=s.pedal_cycle_s + dt_s)
    in_pouring = s.phase is Phase.POURING
    return s, Demands(control=True, heaters_enabled=heaters, mixer=mixer, pump=pump,
                      vibration=pouring and recipe.vibration,
                      vib_heater=in_pouring and recipe.vib_heater,
                      mold_heater=in_pouring and recipe.mold_heater), ev
