"""Control quality on the twin, in virtual time: our controller next to an on/off thermostat.

    python -m bench.control [--config FILE] [--recipe ID] [--json]

Both runs use the same twin (same parameters, same noise seed), the same sequence and the same
set-points; only the zone control law differs (and the baseline's phase tolerance, widened to
1 K: a thermostat swings by its hysteresis plus its lag and never dwells within 0.3 K). The baseline is what legacy machines do: each
heater / cooling stage switched on and off around the set-point with a 0.5 degC hysteresis.

Measured on the twin's *true* chocolate temperature at the pouring point (never on the
quantised sensor reading the PLC sees):
- per-phase durations; heating time (start until every zone's chocolate is within the phase
  tolerance of the heating goal) next to the physical minimum to the same temperature (energy
  the chocolate must take up / full heater power, from the twin's parameters);
- overshoot at each phase change (beyond the heating goal, below the cooling goal, beyond the
  pouring goal), and the largest of them as ``overshoot_c``;
- a 30-minute pouring hold from the release of pouring, with a cold-seed disturbance (15 % of
  the mass at 20 degC) at minute 10: RMS, p95 and max absolute error over the whole hold, the
  disturbance's max deviation and its recovery time back within +-0.1 degC (and staying there).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from opcua_server.config import load
from plc.commands import StartRecipe
from plc.image import Point, ProcessImage, Quality
from plc.program import Program
from plc.runtime import Controller
from twin import Twin
from twin.inprocess import InProcessTwinIo

from .common import emit, fmt

HOLD_S = 1800.0
SEED_AT_S = 600.0
SEED_FRACTION = 0.15
SEED_TEMP_C = 20.0
BAND_C = 0.1
HYSTERESIS_C = 0.5
TIMEOUT_S = 4 * 3600.0
BASELINE_TOLERANCE_K = 1.0


class Thermostat:
    """The baseline: on/off control of every heater and cooling stage, 0.5 degC hysteresis."""

    def __init__(self, program: Program):
        self.p = program
        self.heat: dict[str, bool] = {}
        self.cool: dict[str, bool] = {}

    def apply(self, result, outputs: ProcessImage) -> ProcessImage:
        if not (result.demands.control and result.demands.heaters_enabled):
            return outputs
        values = {n: pt.value for n, pt in outputs.items()}
        h = HYSTERESIS_C / 2
        for z, view in zip(self.p.zones, result.zones):
            if view.pv_c is None or view.sp_c is None:
                continue
            e = view.sp_c - view.pv_c
            heat = self.heat.get(z.name, False)
            heat = True if e > h else False if e < -h else heat
            cool = self.cool.get(z.name, False)
            cool = True if e < -h else False if e > h else cool
            self.heat[z.name], self.cool[z.name] = heat, cool
            for n in z.heating_outputs:
                values[n] = heat
            for n in (*z.cool1_outputs, *z.cool2_outputs):
                values[n] = cool
        ts = next(iter(outputs.values())).timestamp_s
        return ProcessImage({n: Point(bool(v), Quality.GOOD, ts) for n, v in values.items()})


@dataclass
class Run:
    name: str
    phases: dict[str, float] = field(default_factory=dict)
    heating_time_s: float | None = None
    overshoot: dict[str, float] = field(default_factory=dict)
    hold_err: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def run(cfg, book, recipe_id: str, baseline: bool, seed: int = 7,
        program: Program | None = None) -> tuple[Run, float]:
    p = program or Program.from_config(cfg, book)
    if baseline:  # a thermostat cycles +-hysteresis plus its lag: it never dwells within 0.3 K
        p = replace(p, sequence=replace(p.sequence, tolerance_k=max(
            p.sequence.tolerance_k, BASELINE_TOLERANCE_K)))
    recipe = p.recipes[recipe_id]
    twin = Twin(cfg.twin, seed=seed)
    io = InProcessTwinIo(twin)
    c = Controller(p)
    thermo = Thermostat(p) if baseline else None
    out = Run("on/off thermostat" if baseline else "PID (this controller)")
    tol = p.sequence.tolerance_k
    heat_min_s = twin.physical_min_heating_time_s(recipe.heating_goal_c - tol)
    c.submit(StartRecipe(recipe_id, user="bench"))
    dt = p.period_s
    t = 0.0
    phase_start = 0.0
    phase = "heating"
    trace = {"heating": [], "cooling": [], "pouring": []}
    release_t = None
    seeded = False
    t0 = time.perf_counter()
    while t < TIMEOUT_S:
        result = c.cycle(io.read_inputs(), t)
        outputs = thermo.apply(result, result.outputs) if thermo else result.outputs
        io.write_outputs(outputs)
        for e in result.events:
            if e.kind == "phase":
                out.phases[phase] = t - phase_start
                phase, phase_start = str(e.get("to")), t
            elif e.kind == "pouring_released":
                release_t = t
        twin.step(dt, io.outputs)
        t += dt
        pour = twin.pouring_temp_c()
        if phase in trace and release_t is None:
            trace[phase].append(pour)
        if out.heating_time_s is None and phase == "heating" and all(
                twin.true_temp_c(z.name) >= recipe.heating_goal_c - tol for z in p.zones):
            out.heating_time_s = t
        if release_t is not None:
            if not seeded and t - release_t >= SEED_AT_S:
                twin.add_seed(SEED_FRACTION, SEED_TEMP_C)
                seeded = True
            out.hold_err.append(pour - recipe.pouring_goal_c)
            if t - release_t >= HOLD_S:
                break
        if phase in ("fault", "stopped", "idle"):
            raise RuntimeError(f"{out.name}: sequence ended in {phase}: {result.state.first_out}")
    out.phases.setdefault("pouring", t - phase_start)
    # overshoot at each phase change: beyond the goal the phase approaches
    heat_tail = trace["heating"] + trace["cooling"][: int(120 / dt)]
    out.overshoot = {
        "heating": max(0.0, max(heat_tail) - recipe.heating_goal_c),
        "cooling": max(0.0, recipe.cooling_goal_c - min(trace["cooling"] + trace["pouring"][: int(120 / dt)])),
        "pouring": max(0.0, max(trace["pouring"] + [recipe.pouring_goal_c + e for e in out.hold_err[: int(SEED_AT_S / dt)]])
                       - recipe.pouring_goal_c),
    }
    out.wall_s = time.perf_counter() - t0
    return out, heat_min_s


def figures(r: Run, heat_min_s: float, dt: float) -> dict:
    err = np.abs(np.asarray(r.hold_err))
    k = int(round(SEED_AT_S / dt))
    after = err[k:]
    outside = np.nonzero(after > BAND_C)[0]
    recovery = 0.0 if outside.size == 0 else (outside[-1] + 1) * dt
    complete = len(r.hold_err) * dt >= HOLD_S - dt
    return {
        "heating_time_s": r.heating_time_s,
        "heating_time_min_s": heat_min_s,
        "heating_time_ratio": (r.heating_time_s / heat_min_s) if r.heating_time_s else None,
        "overshoot_c": max(r.overshoot.values()),
        "overshoot_heating_c": r.overshoot["heating"],
        "overshoot_cooling_c": r.overshoot["cooling"],
        "overshoot_pouring_c": r.overshoot["pouring"],
        "hold_rms_c": float(np.sqrt(np.mean(err ** 2))),
        "hold_p95_abs_c": float(np.percentile(err, 95)),
        "hold_max_abs_c": float(err.max()),
        "hold_before_disturbance_max_abs_c": float(err[:k].max()),
        "disturbance_max_dev_c": float(after.max()),
        "disturbance_recovery_s": recovery if (complete and outside.size < after.size) else None,
        "phase_heating_s": r.phases.get("heating"),
        "phase_cooling_s": r.phases.get("cooling"),
        "phase_pouring_to_hold_end_s": r.phases.get("pouring"),
        "wall_s": r.wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="machine configuration file (default: the embedded machine)")
    ap.add_argument("--recipe", help="recipe id (default: the machine's default recipe)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    cfg, book = load(args.config)
    recipe_id = args.recipe or cfg.machine.default_recipe
    ours, heat_min = run(cfg, book, recipe_id, baseline=False)
    base, _ = run(cfg, book, recipe_id, baseline=True)
    dt = cfg.period_s
    fo, fb = figures(ours, heat_min, dt), figures(base, heat_min, dt)
    result = {**fo, "recipe": recipe_id, "period_s": dt,
              "hold_rms_ratio_baseline_to_ours": fb["hold_rms_c"] / fo["hold_rms_c"] if fo["hold_rms_c"] else None,
              "baseline": fb}
    rows = [(k, fmt(fo[k]), fmt(fb[k])) for k in fo if k != "wall_s"]
    print(f"Control quality on the twin, recipe {recipe_id}, true pouring-point temperature")
    emit(rows, ("figure", "PID", "on/off 0.5 degC"), result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
