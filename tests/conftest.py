"""Shared fixtures for the tests of the pure PLC core (virtual time: no sleeps, no sockets).

- ``program``: the default machine (config/tempering-machine.yaml + its recipes) as a Program.
- ``make_inputs``: builds an input ProcessImage of a healthy machine, with overrides.
- ``rig``: a plant-free loop around ``plc.scan.scan``: the test sets the temperatures directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import pytest

from plc.commands import Command, Event
from plc.config import load_all
from plc.image import Point, ProcessImage
from plc.program import INPUT_SPECS, ZONES, Program
from plc.scan import ScanContext, ScanResult, scan
from plc.state import PlcState

ROOT = Path(__file__).resolve().parent.parent
MACHINE_FILE = ROOT / "config" / "tempering-machine.yaml"

# A healthy machine at rest: every input good and inside its limits.
HEALTHY: Mapping[str, object] = {
    **{f"temp_{z}": 20.0 for z in ZONES},
    "current_mixer": 1.5, "current_pump": 2.0, "current_vibration": 1.0, "current_total": 8.0,
    "grid_v_l1": 230.0, "grid_v_l2": 230.0, "grid_v_l3": 230.0, "grid_freq": 50.0,
    "estop_ok": True, "pedal": False,
}


def inputs_image(temps: Mapping[str, float] | None = None, timestamp_s: float = 0.0,
                 **values: object) -> ProcessImage:
    """Healthy inputs; ``temps`` maps zone -> degC; ``values`` overrides points by name (a plain
    value becomes a good point, a Point is used as is, ``None`` removes the point)."""
    merged: dict[str, object] = dict(HEALTHY)
    for z, v in (temps or {}).items():
        merged[f"temp_{z}"] = v
    merged.update(values)
    points = {}
    for name, v in merged.items():
        if v is None:
            continue
        points[name] = v if isinstance(v, Point) else Point(v, timestamp_s=timestamp_s)
    return ProcessImage.build(INPUT_SPECS, points)


@pytest.fixture(scope="session")
def program() -> Program:
    cfg, book = load_all(MACHINE_FILE)
    return Program.from_config(cfg, book)


@pytest.fixture(scope="session")
def make_inputs() -> Callable[..., ProcessImage]:
    return inputs_image


class Rig:
    """Drives ``scan`` in virtual time. ``temps`` are what the sensors read (set them directly);
    ``overrides`` are extra input points. Odd ticks add 0.01 degC so a reading never looks
    stuck; set ``dither=False`` to turn that off."""

    def __init__(self, program: Program, state: PlcState | None = None, now_s: float = 0.0,
                 tick: int = 0, temps: Mapping[str, float] | None = None, dither: bool = True):
        self.p = program
        self.state = state or PlcState()
        self.now_s = now_s
        self.tick = tick
        self.temps: dict[str, float] = {z: 20.0 for z in ZONES}
        self.temps.update(temps or {})
        self.overrides: dict[str, object] = {}
        self.dither = dither
        self.events: list[Event] = []
        self.last: ScanResult | None = None

    @property
    def dt(self) -> float:
        return self.p.period_s

    def set(self, **temps: float) -> "Rig":
        self.temps.update(temps)
        return self

    def set_all(self, temp_c: float) -> "Rig":
        return self.set(**{z: temp_c for z in ZONES})

    def image(self) -> ProcessImage:
        d = 0.01 if (self.dither and self.tick % 2) else 0.0
        temps = {z: v + d if isinstance(v, float) else v for z, v in self.temps.items()}
        return inputs_image(temps, self.now_s, **self.overrides)

    def scan(self, *cmds: Command, watchdog: str = "") -> ScanResult:
        r = scan(self.p, self.state, self.image(), list(cmds),
                 ScanContext(self.tick, self.dt, self.now_s, watchdog))
        self.state = r.state
        self.events += r.events
        self.last = r
        self.tick += 1
        self.now_s = round(self.now_s + self.dt, 9)
        return r

    def run(self, seconds: float, until: Callable[[ScanResult], bool] | None = None
            ) -> list[ScanResult]:
        """Scan for ``seconds`` (or until ``until(result)`` is true); returns every result."""
        out = []
        for _ in range(round(seconds / self.dt)):
            r = self.scan()
            out.append(r)
            if until is not None and until(r):
                break
        return out

    def kinds(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


@pytest.fixture(scope="session")
def rig(program: Program) -> Callable[..., Rig]:
    """A factory (stateless, so session-scoped): ``rig(p=None, state=None, temps=..., ...)``."""
    def make(p: Program | None = None, **kw) -> Rig:
        return Rig(p or program, **kw)
    return make
