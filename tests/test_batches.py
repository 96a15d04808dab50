"""Batch records (``opcua_server.batches``): the verdict table, the record's round trip, and
whole batches in virtual time on the twin (normal, a cold top-up while pouring, aborted in
cooling, a trip, a PLC restart in the middle), each scan's snapshot fed to the recorder."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import MACHINE_FILE
from opcua_server.batches import (BatchAlarm, BatchRecord, Criterion, Interruption,
                                  OperatorAction, PhaseSpan, ZonePhaseStats, judge, recipe_hash)
from plc.config import AcceptanceCriteria, load_recipes

RECIPE = load_recipes(MACHINE_FILE.parent / "recipes.yaml")["dark-70"]
CRITERIA = AcceptanceCriteria()


def spans(*phases: str) -> tuple[PhaseSpan, ...]:
    return tuple(PhaseSpan(p, 100.0 * i, 100.0 * (i + 1), 100.0) for i, p in enumerate(phases))


GOOD = {"heating_held_s": 66.0, "cooling_reached": True, "cooling_min_c": 27.4,
        "pouring_s": 900.0, "pouring_in_band_s": 900.0, "pouring_max_dev_k": 0.3,
        "above_working_max_s": 0.0, "tempered_max_c": 31.8, "pouring_in_band_share": 1.0}


def record(outcome: str = "completed", phases: tuple[str, ...] = ("heating", "cooling", "pouring"),
           first_out: str | None = None, **figures) -> BatchRecord:
    recipe = RECIPE.model_dump()
    return BatchRecord(
        batch_id="tempering-01-000007", machine_id="tempering-01", recipe_id="dark-70",
        recipe=recipe, recipe_hash=recipe_hash(recipe), started_at=0.0, ended_at=300.0,
        started_by="op", outcome=outcome, first_out=first_out,
        interruptions=(Interruption(120.0, 160.0, 40.0, "cooling"),), phases=spans(*phases),
        zones=(ZonePhaseStats("pouring", "fountain", 10, 31.2, 31.8, 31.5, 0.1, 2.0, 0.3),),
        alarms=(BatchAlarm(150.0, "zone.pump.deviation_warning", 500, "pump 1.6 K off"),),
        actions=(OperatorAction(0.0, "op", "StartRecipe", "recipe dark-70"),),
        energy_kwh=1.45, energy_kwh_per_kg=0.029, metered_kwh=None, chocolate_kg=50.0,
        criteria=CRITERIA.model_dump(), verdict="", reasons=(), checks=(),
        figures={**GOOD, **figures})


# name, record, verdict, reasons (exact)
JUDGE_CASES = [
    ("normal", record(), "PASS", ()),
    ("heating too short", record(heating_held_s=20.0), "FAIL",
     ("heating goal 48 °C held 20 s only (needs 45 s)",)),
    ("heating never reached", record(heating_held_s=0.0), "FAIL",
     ("heating goal 48 °C never reached",)),
    ("cooling undershoot", record(cooling_min_c=25.9), "FAIL",
     ("cooling fell to 25.9 °C, 1.6 K below the goal 27.5 °C (at most 1 K)",)),
    ("cooling never reached", record(cooling_reached=False, cooling_min_c=29.1), "FAIL",
     ("cooling goal 27.5 °C never reached (lowest 29.1 °C)",)),
    ("pouring band", record(pouring_in_band_s=549.0), "FAIL",
     ("pouring within ±0.5 K of 31.5 °C for 61 % of the time (needs 90 %)",)),
    ("temper lost", record(above_working_max_s=42.0), "FAIL",
     ("pouring above 34.5 °C for 42 s: temper lost",)),
    ("two failures", record(pouring_in_band_s=549.0, above_working_max_s=42.0), "FAIL",
     ("pouring within ±0.5 K of 31.5 °C for 61 % of the time (needs 90 %)",
      "pouring above 34.5 °C for 42 s: temper lost")),
    ("tripped", record("tripped", ("heating",), "zone.pump.over_temp", heating_held_s=0.0,
                       pouring_s=0.0, pouring_in_band_s=0.0), "FAIL",
     ("tripped: first-out zone.pump.over_temp",)),
    ("tripped while pouring, band broken too",
     record("tripped", first_out="estop", pouring_in_band_s=300.0), "FAIL",
     ("tripped: first-out estop",
      "pouring within ±0.5 K of 31.5 °C for 33 % of the time (needs 90 %)")),
    ("aborted in cooling", record("aborted", ("heating", "cooling"), pouring_s=0.0,
                                  pouring_in_band_s=0.0), "INCOMPLETE", ("aborted in cooling",)),
    ("shutdown in heating", record("shutdown", ("heating",), pouring_s=0.0, pouring_in_band_s=0.0),
     "INCOMPLETE", ("shutdown in heating",)),
    ("stopped before release", record("stopped", pouring_s=0.0, pouring_in_band_s=0.0),
     "INCOMPLETE", ("stopped in pouring before pouring was released",)),
    ("aborted after heating too short", record("aborted", ("heating", "cooling"), pouring_s=0.0,
                                               heating_held_s=10.0),
     "INCOMPLETE", ("aborted in cooling", "heating goal 48 °C held 10 s only (needs 45 s)")),
    ("joined late", record(phases=("cooling", "pouring")), "INCOMPLETE",
     ("recorded only from cooling on (the start of the batch was not seen)",)),
]


@pytest.mark.parametrize("rec, verdict, reasons", [c[1:] for c in JUDGE_CASES],
                         ids=[c[0] for c in JUDGE_CASES])
def test_judge(rec, verdict, reasons):
    got_verdict, got_reasons, checks = judge(rec, CRITERIA)
    assert (got_verdict, got_reasons) == (verdict, reasons)
    assert [c.name for c in checks] == ["outcome", "heating", "cooling", "pouring_band",
                                        "working_max"]
    failed = tuple(c.text for c in checks if not c.passed)
    assert failed == reasons or verdict == "INCOMPLETE"


def test_judge_takes_the_criteria_as_a_mapping_and_reads_their_thresholds():
    rec = record(pouring_in_band_s=549.0, heating_held_s=20.0)
    strict, lenient = CRITERIA.model_dump(), {**CRITERIA.model_dump(), "pouring_min_share": 0.6,
                                              "heating_dwell_s": 15.0}
    assert judge(rec, strict)[0] == "FAIL"
    verdict, reasons, checks = judge(rec, lenient)
    assert (verdict, reasons) == ("PASS", ())
    assert Criterion("heating", True, "heating goal 48 °C held 20 s (needs 15 s)") in checks


def test_not_judged_criteria_say_so():
    _, _, checks = judge(record("aborted", ("heating",), pouring_s=0.0), CRITERIA)
    texts = {c.name: (c.passed, c.text) for c in checks}
    assert texts["cooling"] == (True, "cooling: not judged (the batch ended in heating)")
    assert texts["pouring_band"] == (True, "pouring band: not judged (the batch ended in heating)")


def test_record_round_trip_through_json():
    verdict, reasons, checks = judge(record(above_working_max_s=42.0), CRITERIA)
    rec = replace(record(above_working_max_s=42.0), verdict=verdict, reasons=reasons, checks=checks)
    d = json.loads(json.dumps(rec.to_dict()))
    assert BatchRecord.from_dict(d) == rec
    assert d["checks"][0] == {"name": "outcome", "passed": True, "text": "completed"}
    assert rec.recipe_hash == recipe_hash(json.loads(json.dumps(rec.recipe)))
