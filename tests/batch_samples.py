"""Batch records for the tests: ``opcua_server.batches.BatchRecord`` as the interface specifies
it, built with every part filled in (phases, zones, alarms, actions, energy, checks).

Until ``opcua_server/batches.py`` exists, ``stand_in`` is a minimal module of the same shape
(the frozen dataclasses and ``to_dict``/``from_dict``), and the ``batch_module`` fixture puts it
in ``sys.modules`` so ``Records.batch`` finds it."""

from __future__ import annotations

import dataclasses
import sys
import types
from dataclasses import dataclass

import pytest


def _stand_in() -> types.ModuleType:
    @dataclass(frozen=True)
    class PhaseSpan:
        phase: str; start: float; end: float; duration_s: float              # noqa: E702

    @dataclass(frozen=True)
    class ZonePhaseStats:
        phase: str; zone: str; samples: int; min_c: float; max_c: float      # noqa: E702
        mean_c: float; std_c: float; outside_s: float; max_dev_k: float      # noqa: E702

    @dataclass(frozen=True)
    class BatchAlarm:
        time: float; alarm_id: str; priority: int; message: str              # noqa: E702

    @dataclass(frozen=True)
    class OperatorAction:
        time: float; user: str; action: str; detail: str                     # noqa: E702

    @dataclass(frozen=True)
    class Interruption:
        start: float; end: float; gap_s: float; phase: str                   # noqa: E702

    @dataclass(frozen=True)
    class Criterion:
        name: str; passed: bool; text: str                                   # noqa: E702

    parts = {"interruptions": Interruption, "phases": PhaseSpan, "zones": ZonePhaseStats,
             "alarms": BatchAlarm, "actions": OperatorAction, "checks": Criterion}

    @dataclass(frozen=True)
    class BatchRecord:
        batch_id: str; machine_id: str; recipe_id: str; recipe: dict; recipe_hash: str   # noqa: E702
        started_at: float; ended_at: float; started_by: str; outcome: str               # noqa: E702
        first_out: str | None; interruptions: tuple; phases: tuple; zones: tuple        # noqa: E702
        alarms: tuple; actions: tuple; energy_kwh: float                                # noqa: E702
        energy_kwh_per_kg: float | None; metered_kwh: float | None                      # noqa: E702
        chocolate_kg: float | None; criteria: dict; verdict: str; reasons: tuple        # noqa: E702
        checks: tuple

        def to_dict(self) -> dict:
            return dataclasses.asdict(self)

        @classmethod
        def from_dict(cls, d: dict) -> "BatchRecord":
            d = dict(d)
            for name, kind in parts.items():
                d[name] = tuple(kind(**x) for x in d[name])
            d["reasons"] = tuple(d["reasons"])
            return cls(**d)

    module = types.ModuleType("opcua_server.batches")
    for k in (PhaseSpan, ZonePhaseStats, BatchAlarm, OperatorAction, Interruption, Criterion, BatchRecord):
        setattr(module, k.__name__, k)
    return module


try:
    import opcua_server.batches as _real
except ImportError:
    _real = None
batches = _real or _stand_in()


@pytest.fixture
def batch_module(monkeypatch):
    """``opcua_server.batches``, the stand-in installed when the real module is not there."""
    if _real is None:
        monkeypatch.setitem(sys.modules, "opcua_server.batches", batches)
    return batches


T0 = 1_780_000_000.0          # 2026-05-28T20:26:40Z


def record(seq: int = 7, *, machine: str = "tm-1", recipe: str = "dark", start_s: float = T0,
           verdict: str = "PASS", outcome: str = "completed", reasons: tuple[str, ...] = (),
           kg: float | None = 40.0, pouring_share: float | None = 0.97, **changes):
    """A whole batch of ``machine`` numbered ``seq``: heating 30 min, cooling 20 min, pouring
    40 min from ``start_s``; two zones, an alarm, operator actions, 12.5 kWh."""
    b = batches
    h, c, p = start_s, start_s + 1800, start_s + 3000
    end = start_s + 5400
    checks = (b.Criterion("heating_dwell_s", True, "heating goal held for 300 s"),
              b.Criterion("cooling_undershoot_k", True, "cooling lowest 0.4 K below the goal"))
    if pouring_share is not None:
        checks += (b.Criterion("pouring_min_share", verdict == "PASS",
                               f"pouring within ±0.5 K for {pouring_share * 100:.1f} % of the time"),)
    rec = b.BatchRecord(
        batch_id=f"{machine}-{seq:06d}", machine_id=machine, recipe_id=recipe,
        recipe={"name": "Dark 70 %", "heating_goal": 45.0, "cooling_goal": 27.0, "pouring_goal": 31.5},
        recipe_hash="ab" * 32, started_at=start_s, ended_at=end, started_by="olga", outcome=outcome,
        first_out=None,
        interruptions=(b.Interruption(c + 600, c + 660, 60.0, "cooling"),),
        phases=(b.PhaseSpan("heating", h, c, 1800.0), b.PhaseSpan("cooling", c, p, 1200.0),
                b.PhaseSpan("pouring", p, end, 2400.0)),
        zones=(b.ZonePhaseStats("pouring", "tank", 2400, 31.1, 31.9, 31.5, 0.12, 4.0, 0.4),
               b.ZonePhaseStats("pouring", "pump", 2400, 31.2, 32.0, 31.6, 0.15, 0.0, 0.5)),
        alarms=(b.BatchAlarm(c + 100, "zone.tank.deviation", 500, "tank 1.6 K off its set-point"),),
        actions=(b.OperatorAction(h, "olga", "StartRecipe", recipe),
                 b.OperatorAction(c + 30, "olga", "SetTrim", "tank -0.2")),
        energy_kwh=12.5, energy_kwh_per_kg=None if kg is None else 12.5 / kg, metered_kwh=None,
        chocolate_kg=kg,
        criteria={"heating_dwell_s": 300.0, "cooling_undershoot_k": 1.0, "pouring_band_k": 0.5,
                  "pouring_min_share": 0.9, "tolerance_k": 1.0},
        verdict=verdict, reasons=tuple(reasons), checks=checks)
    return dataclasses.replace(rec, **changes) if changes else rec
