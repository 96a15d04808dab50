"""Batch records for the tests (``opcua_server.batches.BatchRecord``), built by hand with every
part filled in: phases, zones, alarms, actions, energy, checks and figures."""

from __future__ import annotations

import dataclasses

from opcua_server import batches as b


T0 = 1_780_000_000.0          # 2026-05-28T20:26:40Z


def record(seq: int = 7, *, machine: str = "tm-1", recipe: str = "dark", start_s: float = T0,
           verdict: str = "PASS", outcome: str = "completed", reasons: tuple[str, ...] = (),
           kg: float | None = 40.0, pouring_share: float | None = 0.97, **changes):
    """A whole batch of ``machine`` numbered ``seq``: heating 30 min, cooling 20 min, pouring
    40 min from ``start_s``; two zones, an alarm, operator actions, 12.5 kWh."""
    h, c, p = start_s, start_s + 1800, start_s + 3000
    end = start_s + 5400
    checks = (b.Criterion("outcome", True, outcome),
              b.Criterion("heating", True, "heating goal 45 °C held 300 s (needs 30 s)"),
              b.Criterion("cooling", True, "cooling fell to 26.6 °C, 0.4 K below the goal 27 °C (at most 1 K)"))
    figures = {"heating_held_s": 300.0, "cooling_reached": True, "cooling_min_c": 26.6,
               "pouring_s": 2400.0, "above_working_max_s": 0.0}
    if pouring_share is not None:
        checks += (b.Criterion("pouring_band", verdict == "PASS", f"pouring within ±0.5 K of 31.5 °C "
                               f"for {pouring_share * 100:.0f} % of the time (needs 90 %)"),)
        figures.update(pouring_in_band_s=2400.0 * pouring_share, pouring_in_band_share=pouring_share)
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
        verdict=verdict, reasons=tuple(reasons), checks=checks, figures=figures)
    return dataclasses.replace(rec, **changes) if changes else rec
