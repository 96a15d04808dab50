"""Autotune on the twin, in virtual time: what a technician does on the machine, simulated.

    outcomes, program = autotune(program, twin_config, zones=("pump",), accept=True)

The commissioning procedure of the README, run on the simulated machine: start a batch of the
recipe and hold it (the heating goal is held, the phase does not complete), let the zones
reach the goal, then autotune the zones one after the other
(``StartAutotune``, the scan's experiment, ``AcceptTuning`` of each proposal) while the others
stay in closed loop. The very scan code of the PLC runs (``plc.runtime.Controller``), against
``twin.Twin`` through ``twin.inprocess.InProcessTwinIo``; nothing here touches the control law.
``tempering autotune ZONE`` and ``bench.control --autotune`` use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from plc import autotune as tune_mod
from plc.commands import AcceptTuning, Command, Hold, StartAutotune, StartRecipe
from plc.program import Program
from plc.runtime import Controller
from plc.scan import ScanResult
from plc.state import Phase

from .config import TwinConfig
from .inprocess import InProcessTwinIo
from .plant import Twin

USER = "commissioning"
WARM_S = 120.0                # every zone at its heating goal this long before the first experiment
TIMEOUT_S = 6 * 3600.0


class TwinAutotuneError(RuntimeError):
    pass


@dataclass
class Session:
    """A controller and a twin in virtual time, scan by scan."""
    controller: Controller
    twin: Twin
    io: InProcessTwinIo
    t: float = 0.0
    last: ScanResult | None = None
    scan_s: list = field(default_factory=list)      # each scan's logic time (wall, s)

    @classmethod
    def start(cls, program: Program, twin_config: TwinConfig, seed: int = 7) -> "Session":
        twin = Twin(twin_config, seed=seed)
        return cls(Controller(program), twin, InProcessTwinIo(twin))

    def run(self, until: Callable[[ScanResult], bool], timeout_s: float,
            command: Command | None = None) -> ScanResult:
        if command is not None:
            self.controller.submit(command)
        end = self.t + timeout_s
        dt = self.controller.program.period_s
        while self.t < end:
            inputs = self.io.read_inputs()
            t0 = time.perf_counter()
            r = self.controller.cycle(inputs, self.t)
            self.scan_s.append(time.perf_counter() - t0)
            self.io.write_outputs(r.outputs)
            self.twin.step(dt, self.io.outputs)
            self.t += dt
            self.last = r
            refused = [e for e in r.events if e.kind == "command_refused"]
            if refused:
                raise TwinAutotuneError(refused[0].message)
            if r.state.phase in (Phase.FAULT, Phase.STOPPED, Phase.IDLE) and self.t > dt:
                raise TwinAutotuneError(f"the batch ended in {r.state.phase.value}: "
                                        f"{r.state.first_out or ''}")
            if until(r):
                return r
        raise TwinAutotuneError(f"no result within {timeout_s:g} s of virtual time")


def _warm(session: Session, recipe_id: str) -> None:
    """Start a batch, hold it, and run until every zone has been at the heating goal for WARM_S."""
    p = session.controller.program
    tol = p.sequence.tolerance_k
    since = [None]

    def warm(r: ScanResult) -> bool:
        at = all(z.pv_c is not None and z.sp_c is not None and abs(z.pv_c - z.sp_c) <= tol
                 for z in r.zones)
        since[0] = (since[0] if since[0] is not None else session.t) if at else None
        return since[0] is not None and session.t - since[0] >= WARM_S

    session.run(lambda r: True, 1.0, StartRecipe(recipe_id, user=USER))
    # held: the heating goal is held and the phase does not complete while the zones are tuned
    session.run(warm, TIMEOUT_S, Hold(user=USER))


def autotune(program: Program, twin_config: TwinConfig, zones: Iterable[str] | None = None, *,
             recipe_id: str | None = None, accept: bool = True, seed: int = 7,
             amplitude_pct: float | None = None, stats: dict | None = None,
             ) -> tuple[dict[str, tune_mod.Outcome], dict[str, dict[str, float]]]:
    """Autotune ``zones`` (default: all, pump and fountain first) on a twin of ``twin_config``.
    Returns each zone's outcome and the run-time tuning the PLC ends with (zone -> gains and
    model, as ``PlcState.tuning`` persists it: a controller started from
    ``PlcState(tuning=...)`` runs as the tuned machine would)."""
    names = list(zones) if zones is not None else ["pump", "fountain", "tank_bottom", "tank_wall"]
    unknown = [n for n in names if n not in {z.name for z in program.zones}]
    if unknown:
        raise TwinAutotuneError(f"unknown zone(s): {', '.join(unknown)}")
    session = Session.start(program, twin_config, seed)
    _warm(session, recipe_id or program.default_recipe)
    outcomes: dict[str, tune_mod.Outcome] = {}
    for name in names:
        r = session.run(lambda r: r.state.autotune is None, TIMEOUT_S,
                        StartAutotune(name, amplitude_pct, user=USER))
        o = r.state.autotune_outcomes[name]
        if o.status == tune_mod.PROPOSED and accept:
            session.run(lambda r: True, 1.0, AcceptTuning(name, user=USER))
            o = session.last.state.autotune_outcomes[name]
        outcomes[name] = o
    if stats is not None:   # the scans' logic time: the identification runs in one of them
        times = sorted(session.scan_s)
        stats.update(scans=len(times), scan_p50_ms=1e3 * times[len(times) // 2],
                     scan_max_ms=1e3 * times[-1], virtual_s=session.t)
    return outcomes, {z: dict(g) for z, g in session.controller.state.tuning.items()}
