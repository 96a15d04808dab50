"""Batch records with a quality verdict, built from the scan's snapshots. Pure.

One job: watch the snapshots of the PLC (``plc.channel.Snapshot``, every one, in order) and
turn each batch, from its ``batch_start`` event to its ``batch_end`` event, into one immutable
``BatchRecord``: the recipe as run, the phases, per phase and zone the temperature figures, the
alarms raised, the operator's actions, the energy, and the verdict of ``judge`` against the
recipe's acceptance criteria (``plc.config.AcceptanceCriteria``).

    recorder = BatchRecorder(machine_id, program, book.recipes, EnergyModel.from_twin(cfg.twin))
    for snap in subscription.drain():
        record = recorder.feed(snap)          # a BatchRecord at the batch_end, else None
    recorder.current()                        # the running figures of the open batch, or None

Rules
- No I/O, no clock: every time is a snapshot's ``time_s`` or an event's ``time_s`` (epoch s).
- Memory is bounded: running sums per (phase, zone), never the samples; the alarms and
  actions of one batch are kept up to ``MAX_ITEMS`` each.
- A sample holds until the next snapshot (zero-order hold): the interval ``[t_k, t_k+1]`` counts
  with snapshot k's readings and outputs. A gap longer than ``max_gap_s`` between two
  snapshots counts for nothing (no energy, no time): what happened is unknown.
- One record per batch id. A PLC restart during a batch leaves a gap and brings the batch back
  ``interrupted`` (same id, same phase): the record keeps going, with an ``Interruption`` from
  the last snapshot before it to the first snapshot resumed (or the batch's end); the phase's
  time carries over (``PhaseSpan.duration_s`` is the phase's time, interruptions left out, a
  hold counted in). Interrupted time counts in no figure.
- Figures (``BatchRecord.figures``, the measurements ``judge`` reads):
  heating: the longest unbroken time every zone was at or above heating goal - tolerance_k;
  cooling: whether both tank zones came within tolerance_k of the cooling goal, their lowest
  reading; pouring (from the release of pouring on, held or not): the time, and the time the
  pouring path (``POURING_ZONES``: pump and fountain, the worse of the two; a bad reading is
  out of band) was within ``pouring_band_k`` of the pouring goal, its largest deviation; tempered: the time any zone was above the
  recipe's working maximum, the highest reading.
- Outcome (from the ``batch_end`` event): completed (Stop while pouring), stopped (Stop
  before pouring was released), aborted, shutdown, tripped (the first-out kept).
- Energy: each heater output (and cooling output with a rated power) counts its rated power
  while on; the meter's power is mean(grid_v_l1..3) x current_total x phases where all are
  good (``current_total`` is the highest phase current: an upper bound on unbalanced loads).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from plc.contract import TANK_ZONES

if TYPE_CHECKING:  # read by attribute only; the core types stay out of this module's imports
    from plc.channel import Snapshot
    from plc.config import AcceptanceCriteria, Recipe
    from plc.program import Program

#: The zones whose readings are the working temperature: the pouring path, from the pump (where
#: the chocolate leaves the tank) to the fountain outlet (where it is poured,
#: ``twin.Twin.pouring_temp_c``). Both have heaters of their own and small masses: they hold the
#: goal through a disturbance of the tank until its heat runs out, then leave the band. The
#: worse of the two counts.
POURING_ZONES = ("pump", "fountain")
RUNNING_PHASES = ("heating", "cooling", "pouring")
VERDICTS = ("PASS", "FAIL", "INCOMPLETE")
OUTCOMES = ("completed", "stopped", "aborted", "tripped", "shutdown")
MAX_ITEMS = 1000          # alarms and actions kept per batch (each)
_J_PER_KWH = 3.6e6


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class PhaseSpan:
    phase: str
    start: float          # epoch s
    end: float
    duration_s: float     # running time within the span (interruptions left out)


@dataclass(frozen=True)
class ZonePhaseStats:
    phase: str
    zone: str
    samples: int
    min_c: float
    max_c: float
    mean_c: float
    std_c: float
    outside_s: float      # time with |pv - set-point| > tolerance_k
    max_dev_k: float      # largest |pv - set-point|


@dataclass(frozen=True)
class BatchAlarm:
    time: float
    alarm_id: str
    priority: int
    message: str


@dataclass(frozen=True)
class OperatorAction:
    time: float
    user: str
    action: str           # the command's name: StartRecipe, Hold, Resume, Stop, Abort, SetTrim ...
    detail: str


@dataclass(frozen=True)
class Interruption:
    start: float          # the last snapshot before the interruption
    end: float            # the first snapshot resumed (or the batch's end)
    gap_s: float
    phase: str


@dataclass(frozen=True)
class Criterion:
    name: str             # heating | cooling | pouring_band | working_max | outcome
    passed: bool
    text: str             # the figure, e.g. "pouring above 34.5 °C for 42 s: temper lost"


_NESTED = {"interruptions": Interruption, "phases": PhaseSpan, "zones": ZonePhaseStats,
           "alarms": BatchAlarm, "actions": OperatorAction, "checks": Criterion}


@dataclass(frozen=True)
class BatchRecord:
    batch_id: str
    machine_id: str
    recipe_id: str
    recipe: dict            # the recipe as run (plc.config.Recipe.model_dump())
    recipe_hash: str        # sha256 hex of json.dumps(recipe, sort_keys=True)
    started_at: float
    ended_at: float
    started_by: str
    outcome: str            # completed | stopped | aborted | tripped | shutdown
    first_out: str | None
    interruptions: tuple[Interruption, ...]
    phases: tuple[PhaseSpan, ...]
    zones: tuple[ZonePhaseStats, ...]
    alarms: tuple[BatchAlarm, ...]
    actions: tuple[OperatorAction, ...]
    energy_kwh: float
    energy_kwh_per_kg: float | None
    metered_kwh: float | None
    chocolate_kg: float | None
    criteria: dict          # the AcceptanceCriteria it was judged by (model_dump())
    verdict: str            # PASS | FAIL | INCOMPLETE
    reasons: tuple[str, ...]        # the failed criteria's texts (INCOMPLETE: why incomplete)
    checks: tuple[Criterion, ...]   # every criterion, passed or not
    figures: dict = field(default_factory=dict)   # the measurements judged (module docstring)

    def to_dict(self) -> dict:
        """JSON-able: tuples become lists, nested records dicts."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BatchRecord":
        kw = dict(d)
        for k, typ in _NESTED.items():
            kw[k] = tuple(typ(**x) for x in kw.get(k, ()))
        kw["reasons"] = tuple(kw.get("reasons", ()))
        kw["figures"] = dict(kw.get("figures") or {})
        return cls(**kw)

    def zone_stats(self, phase: str, zone: str) -> ZonePhaseStats | None:
        return next((z for z in self.zones if z.phase == phase and z.zone == zone), None)


# --------------------------------------------------------------------------- the verdict


def _crit(criteria: "AcceptanceCriteria | Mapping[str, float]") -> Mapping[str, float]:
    return criteria if isinstance(criteria, Mapping) else criteria.model_dump()


def _g(v: float) -> str:
    """A figure as shown in a text: at most two decimals, no trailing zeros (27.5, 1, 0.25)."""
    return f"{v:.2f}".rstrip("0").rstrip(".") if v == v else "?"


def judge(record: BatchRecord, criteria: "AcceptanceCriteria | Mapping[str, float]"
          ) -> tuple[str, tuple[str, ...], tuple[Criterion, ...]]:
    """The verdict of a record (its ``verdict``/``reasons``/``checks`` are ignored) against
    ``criteria`` (an AcceptanceCriteria or its model_dump()): (verdict, reasons, checks).

    A criterion is judged only once its phase is over (heating: the batch went on to cooling;
    cooling: on to pouring; the pouring band: pouring was released); otherwise it is listed as
    not judged (passed). FAIL: a trip (its first-out first) or any failed criterion; INCOMPLETE:
    the batch ended before pouring (stopped, aborted, shutdown) or the record misses its start,
    the why first, then any criterion failed so far; PASS otherwise. The figures are the
    record's (``figures``), measured with the bands of the criteria it was recorded with."""
    c, f, r = _crit(criteria), record.figures, record.recipe
    seen = [p.phase for p in record.phases]
    checks: list[Criterion] = []
    heat_goal, cool_goal = r.get("heating_goal"), r.get("cooling_goal")
    pour_goal, wmax = r.get("pouring_goal"), r.get("working_max")

    def not_judged(name: str, what: str) -> Criterion:
        last = seen[-1] if seen else "no phase"
        return Criterion(name, True, f"{what}: not judged (the batch ended in {last})")

    if "cooling" in seen or "pouring" in seen:
        held, need = f.get("heating_held_s", 0.0), c["heating_dwell_s"]
        if held <= 0.0:
            checks.append(Criterion("heating", False, f"heating goal {_g(heat_goal)} °C never reached"))
        else:
            ok = held >= need
            checks.append(Criterion("heating", ok, f"heating goal {_g(heat_goal)} °C held "
                                    f"{held:.0f} s{'' if ok else ' only'} (needs {need:.0f} s)"))
    else:
        checks.append(not_judged("heating", "heating"))

    if "pouring" in seen:
        low, limit = f.get("cooling_min_c"), c["cooling_undershoot_k"]
        if not f.get("cooling_reached"):
            checks.append(Criterion("cooling", False, f"cooling goal {_g(cool_goal)} °C never "
                                    f"reached (lowest {_g(low if low is not None else math.nan)} °C)"))
        else:
            under = cool_goal - low if low is not None else 0.0
            ok = under <= limit + 1e-9
            checks.append(Criterion("cooling", ok, f"cooling fell to {_g(low)} °C, "
                                    f"{max(under, 0.0):.1f} K below the goal {_g(cool_goal)} °C "
                                    f"(at most {_g(limit)} K)"))
    else:
        checks.append(not_judged("cooling", "cooling"))

    pour_s = f.get("pouring_s", 0.0)
    if pour_s > 0.0:
        share = f.get("pouring_in_band_s", 0.0) / pour_s
        need = c["pouring_min_share"]
        ok = share >= need - 1e-9
        checks.append(Criterion("pouring_band", ok, f"pouring within ±{_g(c['pouring_band_k'])} K "
                                f"of {_g(pour_goal)} °C for {share * 100:.0f} % of the time "
                                f"(needs {need * 100:.0f} %)"))
    else:
        checks.append(not_judged("pouring_band", "pouring band"))

    above = f.get("above_working_max_s", 0.0)
    if above > 0.0:
        checks.append(Criterion("working_max", False, f"pouring above {_g(wmax)} °C for "
                                f"{above:.0f} s: temper lost"))
    else:
        checks.append(Criterion("working_max", True, f"never above {_g(wmax)} °C once tempered"))

    failed = [k.text for k in checks if not k.passed]
    why = _incomplete(record, seen, pour_s)
    if record.outcome == "tripped":
        text = f"tripped: first-out {record.first_out or '?'}"
        checks.insert(0, Criterion("outcome", False, text))
        return "FAIL", (text, *failed), tuple(checks)
    checks.insert(0, Criterion("outcome", not why, why or record.outcome))
    if why:
        return "INCOMPLETE", (why, *failed), tuple(checks)
    return ("FAIL" if failed else "PASS"), tuple(failed), tuple(checks)


def _incomplete(record: BatchRecord, seen: list[str], pouring_s: float) -> str:
    last = seen[-1] if seen else "no phase"
    if seen and seen[0] != "heating":
        return f"recorded only from {seen[0]} on (the start of the batch was not seen)"
    if record.outcome in ("aborted", "shutdown"):
        return f"{record.outcome} in {last}"
    if record.outcome == "stopped" or pouring_s <= 0.0:
        return f"stopped in {last} before pouring was released"
    return ""


# --------------------------------------------------------------------------- energy


@dataclass(frozen=True)
class EnergyModel:
    """Rated electrical powers of the outputs (W, by output name: heater_<zone>, vib_heater,
    mold_heater; cooling stages if they draw power), the charge of chocolate (kg, None:
    unknown) and the number of supply phases (for the meter's power)."""
    heater_w: Mapping[str, float] = field(default_factory=dict)
    cooling_w: Mapping[str, float] = field(default_factory=dict)
    chocolate_kg: float | None = None
    phases: int = 3

    @classmethod
    def from_twin(cls, twin: Any, phases: int = 3) -> "EnergyModel":
        """From the twin's configuration (``twin.config.TwinConfig``, read by attribute): the
        zones' heater powers, the table and mold heaters, the charge of the four zones. The
        tank cooling is a coolant circuit: no electrical rating."""
        zones = {n: getattr(twin.zones, n) for n in ("tank_bottom", "tank_wall", "pump", "fountain")}
        heater = {f"heater_{n}": float(z.heater_power_w) for n, z in zones.items()}
        heater.update(vib_heater=float(twin.vib_heater_power_w),
                      mold_heater=float(twin.mold_heater_power_w))
        return cls(heater, {}, float(sum(z.chocolate_mass_kg for z in zones.values())), phases)

    def power_w(self, outputs: Any) -> float:
        """Rated power of the outputs that are on in the output image ``outputs``."""
        total = 0.0
        for name, w in (*self.heater_w.items(), *self.cooling_w.items()):
            p = outputs.get_point(name)
            if p.good and p.value:
                total += w
        return total

    def metered_w(self, inputs: Any) -> float | None:
        """The meter's power (W) from the input image, or None where a reading is not good."""
        volts = [inputs.get_point(f"grid_v_l{i}").usable_float() for i in (1, 2, 3)]
        amps = inputs.get_point("current_total").usable_float()
        if amps is None or any(v is None for v in volts):
            return None
        return sum(volts) / 3.0 * amps * self.phases


# --------------------------------------------------------------------------- the recorder


class _Acc:
    """Running figures of one zone in one phase (Welford mean and variance)."""
    __slots__ = ("n", "mean", "m2", "lo", "hi", "outside_s", "max_dev")

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.lo, self.hi, self.outside_s, self.max_dev = math.inf, -math.inf, 0.0, 0.0

    def add(self, v: float, sp: float | None) -> None:
        self.n += 1
        d = v - self.mean
        self.mean += d / self.n
        self.m2 += d * (v - self.mean)
        self.lo, self.hi = min(self.lo, v), max(self.hi, v)
        if sp is not None:
            self.max_dev = max(self.max_dev, abs(v - sp))

    def stats(self, phase: str, zone: str) -> ZonePhaseStats:
        std = math.sqrt(self.m2 / self.n) if self.n > 1 else 0.0
        return ZonePhaseStats(phase, zone, self.n, self.lo, self.hi, self.mean, std,
                              self.outside_s, self.max_dev)


@dataclass
class _Prev:
    """What the interval after a snapshot counts with (the zero-order hold)."""
    time: float
    phase: str
    interrupted: bool
    released: bool
    tempered: bool
    pv: dict[str, float | None]
    sp: dict[str, float | None]
    power_w: float
    metered_w: float | None


class _Batch:
    """The open batch: running sums only."""

    def __init__(self, batch_id: str, recipe_id: str, recipe: dict, criteria: Mapping[str, float],
                 started_at: float, started_by: str) -> None:
        self.batch_id, self.recipe_id, self.recipe = batch_id, recipe_id, recipe
        self.criteria = dict(criteria)
        self.started_at, self.started_by = started_at, started_by
        self.spans: list[list] = []                  # [phase, start, end, running_s]
        self.acc: dict[tuple[str, str], _Acc] = {}
        self.alarms: list[BatchAlarm] = []
        self.actions: list[OperatorAction] = []
        self.interruptions: list[Interruption] = []
        self.open_gap: tuple[float, str] | None = None
        self.prev: _Prev | None = None
        self.energy_j = 0.0
        self.metered_j = 0.0
        self.metered_seen = False
        self.heat_run_s = 0.0
        self.f = {"heating_held_s": 0.0, "cooling_reached": False, "cooling_min_c": None,
                  "pouring_s": 0.0, "pouring_in_band_s": 0.0, "pouring_max_dev_k": None,
                  "above_working_max_s": 0.0,
                  "tempered_max_c": None}

    def add_item(self, items: list, item: object) -> None:
        if len(items) < MAX_ITEMS:
            items.append(item)


class BatchRecorder:
    """Snapshots in, one ``BatchRecord`` per batch out (module docstring).

    ``program``: the PLC's ``plc.program.Program`` (zones, scan period, phase count);
    ``recipes``: the validated recipes by id (``plc.config.Recipe``: the recipe as run and its
    ``acceptance``; a ``RecipeBook`` will do); ``energy``: the rated powers and the charge. ``max_gap_s``: a longer
    silence between two snapshots counts for nothing (default 10 scans, at least 1 s)."""

    def __init__(self, machine_id: str, program: "Program", recipes: Mapping[str, "Recipe"],
                 energy: EnergyModel, max_gap_s: float | None = None) -> None:
        self.machine_id = machine_id
        self.program = program
        self.recipes = _by_id(recipes)
        self.energy = energy
        self.zones = tuple(z.name for z in program.zones)
        self.max_gap_s = max_gap_s if max_gap_s is not None else max(1.0, 10 * program.period_s)
        self._open: _Batch | None = None
        self._settings: Mapping[str, Mapping[str, float]] = {}

    def set_recipes(self, recipes: Mapping[str, "Recipe"]) -> None:
        """The recipe book edited at run time (a running batch keeps the recipe it started with)."""
        self.recipes = _by_id(recipes)

    # ------------------------------------------------------------------ feeding

    def feed(self, snap: "Snapshot") -> BatchRecord | None:
        """One snapshot (every one, in order). Returns the finished record at the snapshot that
        carries the batch's ``batch_end`` event, else None."""
        done: BatchRecord | None = None
        b = self._open
        if b is None and snap.batch_id and snap.phase in RUNNING_PHASES and not any(
                e.kind == "batch_start" for e in snap.events):
            b = self._open = self._start(snap.batch_id, snap.recipe_id or "", snap.time_s, "")
        if b is not None:
            self._integrate(b, snap.time_s)
        settings_before = self._settings
        self._settings = snap.settings or {}
        pending: list[OperatorAction] = []   # StartRecipe accepted before its batch_start
        for e in snap.events:
            if e.kind == "command_accepted":
                act = self._action(e, settings_before, self._settings)
                if self._open is not None:
                    self._open.add_item(self._open.actions, act)
                elif e.get("command") == "StartRecipe":
                    pending.append(act)
            elif e.kind == "alarm" and e.get("transition") == "active" and self._open is not None:
                a = e.get("alarm")
                self._open.add_item(self._open.alarms, BatchAlarm(
                    e.time_s, str(e.get("alarm_id")), int(e.get("priority") or 0),
                    getattr(a, "message", "") or e.message))
            elif e.kind == "batch_start":
                if self._open is not None:   # never without an end; closed as stopped
                    done = self._finish(self._open, e.time_s, "completed", None)
                b = self._open = self._start(str(e.get("batch_id")), str(e.get("recipe_id")),
                                             e.time_s, str(e.get("user") or ""))
                for act in pending:
                    detail = "; ".join(x for x in (f"recipe {b.recipe_id}", act.detail) if x)
                    b.add_item(b.actions, replace(act, detail=detail))
            elif e.kind == "batch_end" and self._open is not None and (
                    e.get("batch_id") == self._open.batch_id):
                outcome = str(e.get("outcome") or "")
                first_out = snap.first_out if outcome.startswith("fault") else None
                if outcome.startswith("fault:"):
                    first_out = outcome.partition(":")[2].strip() or first_out
                done = self._finish(self._open, e.time_s, outcome, first_out)
                self._open = None
        b = self._open
        if b is not None and snap.batch_id == b.batch_id and snap.phase in RUNNING_PHASES:
            self._sample(b, snap)
        return done

    def current(self) -> dict | None:
        """The running figures of the open batch (None without one): batch_id, recipe_id,
        started_at, phase, phase_s (carried over interruptions), energy_kwh, metered_kwh,
        interrupted, alarms, actions and the figures so far."""
        b = self._open
        if b is None:
            return None
        span = b.spans[-1] if b.spans else None
        return {"batch_id": b.batch_id, "recipe_id": b.recipe_id, "started_at": b.started_at,
                "phase": span[0] if span else None, "phase_s": span[3] if span else 0.0,
                "energy_kwh": b.energy_j / _J_PER_KWH,
                "metered_kwh": b.metered_j / _J_PER_KWH if b.metered_seen else None,
                "interrupted": b.open_gap is not None, "interruptions": len(b.interruptions),
                "alarms": len(b.alarms), "actions": len(b.actions),
                "figures": _figures(b)}

    # ------------------------------------------------------------------ internals

    def _start(self, batch_id: str, recipe_id: str, time_s: float, user: str) -> _Batch:
        recipe = self.recipes.get(recipe_id)
        if recipe is not None:
            data, criteria = recipe.model_dump(), recipe.acceptance.model_dump()
        else:   # not in the book (deleted meanwhile): the program's goals, default criteria
            any_recipe = next(iter(self.recipes.values()), None)
            rp = self.program.recipes.get(recipe_id)
            data = {} if rp is None else {
                "name": rp.name, "heating_goal": rp.heating_goal_c, "cooling_goal": rp.cooling_goal_c,
                "pouring_goal": rp.pouring_goal_c, "working_max": rp.working_max_c}
            criteria = (type(any_recipe).model_fields["acceptance"].default.model_dump()
                        if any_recipe is not None else {})
        return _Batch(batch_id, recipe_id, data, criteria, time_s, user)

    @staticmethod
    def _action(e: Any, before: Mapping, after: Mapping) -> OperatorAction:
        parts = []
        changes = [f"{z} {k} {_g(before.get(z, {}).get(k, math.nan))} -> {_g(v)}"
                   for z, vals in after.items() for k, v in vals.items()
                   if before.get(z, {}).get(k) != v]
        changes += [f"{z} {k} {_g(v)} -> auto" for z, vals in before.items() for k, v in vals.items()
                    if k not in after.get(z, {})]
        if e.get("command") in ("SetTrim", "SetTuning", "SetManual"):
            parts += changes
        if e.get("origin"):
            parts.append(f"via {e.get('origin')}")
        return OperatorAction(e.time_s, str(e.get("user") or ""), str(e.get("command") or ""),
                              "; ".join(parts))

    def _integrate(self, b: _Batch, now: float) -> None:
        """The interval since the previous snapshot, with the previous snapshot's values."""
        p = b.prev
        if p is None:
            return
        dt = now - p.time
        if not (0.0 < dt <= self.max_gap_s):
            return
        b.energy_j += p.power_w * dt
        if p.metered_w is not None:
            b.metered_j += p.metered_w * dt
        if p.interrupted or p.phase not in RUNNING_PHASES:
            return
        if b.spans and b.spans[-1][0] == p.phase:
            b.spans[-1][3] += dt
        c, r, f = b.criteria, b.recipe, b.f
        tol = c.get("tolerance_k", 0.5)
        for z in self.zones:
            pv, sp = p.pv.get(z), p.sp.get(z)
            if pv is not None and sp is not None and abs(pv - sp) > tol:
                self._acc(b, p.phase, z).outside_s += dt
        pvs = [p.pv.get(z) for z in self.zones]
        if p.phase == "heating" and "heating_goal" in r:
            if all(v is not None and v >= r["heating_goal"] - tol for v in pvs):
                b.heat_run_s += dt
                f["heating_held_s"] = max(f["heating_held_s"], b.heat_run_s)
            else:
                b.heat_run_s = 0.0
        if p.phase == "pouring" and p.released and "pouring_goal" in r:
            f["pouring_s"] += dt
            vs = [p.pv.get(z) for z in POURING_ZONES]
            if all(v is not None for v in vs):
                dev = max(abs(v - r["pouring_goal"]) for v in vs)
                f["pouring_max_dev_k"] = max(dev, f["pouring_max_dev_k"] or 0.0)
                if dev <= c.get("pouring_band_k", 0.5) + 1e-9:
                    f["pouring_in_band_s"] += dt
        if p.tempered and "working_max" in r and any(
                v is not None and v > r["working_max"] for v in pvs):
            f["above_working_max_s"] += dt

    def _acc(self, b: _Batch, phase: str, zone: str) -> _Acc:
        acc = b.acc.get((phase, zone))
        if acc is None:
            acc = b.acc[(phase, zone)] = _Acc()
        return acc

    def _sample(self, b: _Batch, snap: "Snapshot") -> None:
        t, phase = snap.time_s, snap.phase
        if snap.interrupted and b.open_gap is None:
            b.open_gap = (b.prev.time if b.prev is not None else t, phase)
        elif not snap.interrupted and b.open_gap is not None:
            self._close_gap(b, t)
        if not b.spans or b.spans[-1][0] != phase:
            if b.spans:
                b.spans[-1][2] = t
            b.spans.append([phase, t, t, 0.0])
        b.spans[-1][2] = t
        pv = {z.name: z.pv_c for z in snap.zones}
        sp = {z.name: z.sp_c for z in snap.zones}
        if not snap.interrupted:
            f, r, tol = b.f, b.recipe, b.criteria.get("tolerance_k", 0.5)
            for z in snap.zones:
                if z.pv_c is not None:
                    self._acc(b, phase, z.name).add(z.pv_c, z.sp_c)
            tank = [pv.get(z) for z in TANK_ZONES]
            if phase == "cooling" and "cooling_goal" in r and all(v is not None for v in tank):
                low = min(tank)
                f["cooling_min_c"] = low if f["cooling_min_c"] is None else min(f["cooling_min_c"], low)
                if all(abs(v - r["cooling_goal"]) <= tol for v in tank):
                    f["cooling_reached"] = True
            if snap.tempered:
                hi = max((v for v in pv.values() if v is not None), default=None)
                if hi is not None:
                    f["tempered_max_c"] = hi if f["tempered_max_c"] is None else max(f["tempered_max_c"], hi)
        b.prev = _Prev(t, phase, snap.interrupted, snap.pouring_released, snap.tempered, pv, sp,
                       self.energy.power_w(snap.outputs), self.energy.metered_w(snap.inputs))
        if b.prev.metered_w is not None:
            b.metered_seen = True

    @staticmethod
    def _close_gap(b: _Batch, end: float) -> None:
        start, phase = b.open_gap
        b.interruptions.append(Interruption(start, end, end - start, phase))
        b.open_gap = None

    def _finish(self, b: _Batch, end: float, outcome: str, first_out: str | None) -> BatchRecord:
        if b.open_gap is not None:
            self._close_gap(b, end)
        if b.spans:
            b.spans[-1][2] = end
        if outcome.startswith("fault"):
            outcome = "tripped"
        elif outcome == "completed" and b.f["pouring_s"] <= 0.0:
            outcome = "stopped"
        elif outcome not in OUTCOMES:
            outcome = "aborted" if outcome else "stopped"
        kwh = b.energy_j / _J_PER_KWH
        kg = self.energy.chocolate_kg
        order = {ph: i for i, ph in enumerate(RUNNING_PHASES)}
        zones = tuple(a.stats(ph, z) for (ph, z), a in sorted(
            b.acc.items(), key=lambda kv: (order.get(kv[0][0], 9), self._zone_order(kv[0][1])))
            if a.n)
        rec = BatchRecord(
            batch_id=b.batch_id, machine_id=self.machine_id, recipe_id=b.recipe_id,
            recipe=b.recipe, recipe_hash=recipe_hash(b.recipe), started_at=b.started_at,
            ended_at=end, started_by=b.started_by, outcome=outcome, first_out=first_out,
            interruptions=tuple(b.interruptions),
            phases=tuple(PhaseSpan(ph, s, e, d) for ph, s, e, d in b.spans),
            zones=zones, alarms=tuple(b.alarms), actions=tuple(b.actions),
            energy_kwh=kwh, energy_kwh_per_kg=kwh / kg if kg else None,
            metered_kwh=b.metered_j / _J_PER_KWH if b.metered_seen else None, chocolate_kg=kg,
            criteria=dict(b.criteria), verdict="", reasons=(), checks=(), figures=_figures(b))
        verdict, reasons, checks = judge(rec, b.criteria) if b.criteria else (
            "INCOMPLETE", ("no acceptance criteria for the recipe",), ())
        return replace(rec, verdict=verdict, reasons=reasons, checks=checks)

    def _zone_order(self, zone: str) -> int:
        return self.zones.index(zone) if zone in self.zones else len(self.zones)


def _by_id(recipes: Any) -> Mapping[str, Any]:
    """Recipes by id from a mapping or a ``plc.config.RecipeBook``."""
    return getattr(recipes, "recipes", recipes)


def _figures(b: _Batch) -> dict:
    f = dict(b.f)
    f["cooling_reached"] = bool(f["cooling_reached"])
    f["pouring_in_band_share"] = (f["pouring_in_band_s"] / f["pouring_s"]) if f["pouring_s"] else None
    return f


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """sha256 hex of ``json.dumps(recipe, sort_keys=True)``."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
