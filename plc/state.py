"""The PLC's state between scans, and the part of it that survives a restart.

``PlcState`` is a frozen value; the scan returns a new one each cycle (its dict fields are never
mutated after construction). ``persistent()`` extracts what must survive a restart or a power
loss — active recipe and phase, batch, latched trips and first-out, operator trims and manual
outputs, PID gains changed at run time (by hand or an accepted autotune, with the model it
identified), and every alarm's lifecycle (active, acknowledged,
confirmed, enabled, shelving and its end, suppression, last message, user, comment, seq and
times: an unacknowledged alarm stays unacknowledged and a shelve stays shelved across a kill -9)
— and ``restored()`` builds the state the PLC comes up in: outputs safe, the last state
visible, and a running batch *interrupted* until an operator resumes or aborts it (never
resuming heating by itself). The runtime marks the state it starts from ``restarted``: its
first scan reports the alarm system (event ``alarm_system``) and Reset waits for that scan's
evaluation of the conditions.

A running autotune and the last autotune outcomes are not persisted: a restart ends the
experiment (the batch comes back interrupted anyway) and drops a proposal nobody accepted yet;
what an accepted autotune changed is in ``tuning``.

File versions: 2 (alarms added); version 1 files (no alarms) are read as before.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from .alarms import Alarm, Priority, Shelving
from .autotune import Experiment, Outcome
from .pid import PidState, PwmState


class Phase(enum.Enum):
    IDLE = "idle"
    HEATING = "heating"
    COOLING = "cooling"
    POURING = "pouring"
    STOPPED = "stopped"
    FAULT = "fault"


RUNNING = (Phase.HEATING, Phase.COOLING, Phase.POURING)


@dataclass(frozen=True, slots=True)
class ZoneState:
    pid: PidState = PidState()
    reached: bool = False            # the zone has been at its goal in this phase
    last_reading: float | None = None
    unchanged_s: float = 0.0         # for the stuck-sensor check


@dataclass(frozen=True, slots=True)
class PlcState:
    phase: Phase = Phase.IDLE
    recipe_id: str | None = None
    batch_id: str | None = None
    batch_seq: int = 0
    held: bool = False
    interrupted: bool = False
    tempered: bool = False
    phase_time_s: float = 0.0
    dwell_s: float = 0.0
    mixer_run_s: float = 0.0
    pump_warm_s: float = 0.0
    pump_ready: bool = False
    pouring_released: bool = False
    pedal_cycle_s: float = 0.0
    zones: Mapping[str, ZoneState] = field(default_factory=dict)
    pwm: Mapping[str, PwmState] = field(default_factory=dict)
    manual: Mapping[str, float] = field(default_factory=dict)
    trims: Mapping[str, float] = field(default_factory=dict)
    tuning: Mapping[str, Mapping[str, float]] = field(default_factory=dict)   # zone -> TUNING_KEYS
    autotune: Experiment | None = None                 # the running experiment (one zone at a time)
    autotune_outcomes: Mapping[str, Outcome] = field(default_factory=dict)   # zone -> the last
    alarms: Mapping[str, Alarm] = field(default_factory=dict)
    trips: frozenset[str] = frozenset()
    first_out: str | None = None
    timers: Mapping[str, float] = field(default_factory=dict)   # on-delay timers of conditions
    restarted: bool = False          # the runtime started from it; cleared by the first scan

    def persistent(self) -> dict:
        """The JSON-able subset that survives a restart."""
        return {
            "version": VERSION,
            "phase": self.phase.value,
            "recipe_id": self.recipe_id,
            "batch_id": self.batch_id,
            "batch_seq": self.batch_seq,
            "held": self.held,
            "interrupted": self.interrupted,
            "tempered": self.tempered,
            "trips": sorted(self.trips),
            "first_out": self.first_out,
            "trims": dict(sorted(self.trims.items())),
            "manual": dict(sorted(self.manual.items())),
            "tuning": {z: dict(sorted(g.items())) for z, g in sorted(self.tuning.items())},
            "alarms": {k: _alarm_data(a) for k, a in sorted(self.alarms.items())},
        }


VERSION = 2
# a zone's run-time tuning: the gains, and the model an accepted autotune identified
TUNING_KEYS = ("kp", "ki", "kd", "d_filter_s", "model_gain_k_per_pct", "model_tau_s",
               "model_dead_s")
_ALARM_FIELDS = ("active", "acked", "confirmed", "enabled", "suppressed", "unshelve_at",
                 "message", "trip", "active_since", "changed", "user", "comment", "seq")


def _alarm_data(a: Alarm) -> dict:
    d = {f: getattr(a, f) for f in _ALARM_FIELDS}
    d["shelving"] = a.shelving.value
    d["priority"] = int(a.priority)
    return d


def _alarm(aid: str, d: Mapping) -> Alarm:
    opt = lambda v: None if v is None else float(v)  # noqa: E731
    return Alarm(aid, active=bool(d.get("active")), acked=bool(d.get("acked", True)),
                 confirmed=bool(d.get("confirmed", True)), enabled=bool(d.get("enabled", True)),
                 suppressed=bool(d.get("suppressed")),
                 shelving=Shelving(d.get("shelving", "unshelved")),
                 unshelve_at=opt(d.get("unshelve_at")), message=str(d.get("message", "")),
                 priority=Priority(int(d.get("priority", Priority.LOW))), trip=bool(d.get("trip")),
                 active_since=opt(d.get("active_since")), changed=float(d.get("changed", 0.0)),
                 user=str(d.get("user", "")), comment=str(d.get("comment", "")),
                 seq=int(d.get("seq", 0)))


def restored(data: Mapping | None, recipes: Mapping[str, object], zones: tuple[str, ...]) -> PlcState:
    """The state after a restart. Unknown or damaged content falls back to a safe default."""
    if not data:
        return PlcState()
    try:
        return _restored(data, recipes, zones)
    except (TypeError, ValueError, AttributeError):  # valid JSON, damaged values
        return PlcState()


def _restored(data: Mapping, recipes: Mapping[str, object], zones: tuple[str, ...]) -> PlcState:
    phase = Phase(data.get("phase", "idle"))
    recipe_id = data.get("recipe_id")
    if recipe_id is not None and recipe_id not in recipes:
        recipe_id = None
        if phase in RUNNING:
            phase = Phase.STOPPED
    interrupted = bool(data.get("interrupted")) or phase in RUNNING
    return PlcState(
        phase=phase, recipe_id=recipe_id, batch_id=data.get("batch_id"),
        batch_seq=int(data.get("batch_seq", 0)), held=bool(data.get("held")),
        interrupted=interrupted and phase in RUNNING, tempered=bool(data.get("tempered")),
        trips=frozenset(data.get("trips", ())), first_out=data.get("first_out"),
        trims={k: float(v) for k, v in dict(data.get("trims", {})).items() if k in zones},
        manual={k: float(v) for k, v in dict(data.get("manual", {})).items() if k in zones},
        tuning={z: {k: float(v) for k, v in dict(g).items() if k in TUNING_KEYS}
                for z, g in dict(data.get("tuning", {})).items() if z in zones},
        alarms={k: _alarm(k, d) for k, d in dict(data.get("alarms", {})).items()
                if not k.startswith("zone.") or k.split(".")[1] in zones})
