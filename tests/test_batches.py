"""Batch records (``opcua_server.batches``): the verdict table, the record's round trip, and
whole batches in virtual time on the twin (normal, a cold top-up while pouring, aborted in
cooling, a trip, a PLC restart in the middle), each scan's snapshot fed to the recorder."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from conftest import MACHINE_FILE
from opcua_server.batches import (BatchAlarm, BatchRecord, BatchRecorder, Criterion, EnergyModel,
                                  Interruption, OperatorAction, PhaseSpan, ZonePhaseStats, judge,
                                  recipe_hash)
from opcua_server.config import load
from plc.channel import SnapshotChannel
from plc.commands import Abort, Resume, SetTrim, StartRecipe, Stop
from plc.config import AcceptanceCriteria
from plc.program import Program
from plc.runtime import Controller, run_virtual
from plc.state import restored
from twin import Twin
from twin.inprocess import InProcessTwinIo

CFG, BOOK = load(MACHINE_FILE)
PROGRAM = Program.from_config(CFG, BOOK)
ZONES = tuple(z.name for z in PROGRAM.zones)
RECIPE = BOOK["dark-70"]
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


# --------------------------------------------------------------------------- on the twin

class Line:
    """A machine on the twin in virtual time with a batch recorder fed every snapshot, as the
    window does (a channel subscription drained after each stretch of scans)."""

    def __init__(self, **twin_kw):
        self.twin = Twin(CFG.twin, seed=1, **twin_kw)
        self.io = InProcessTwinIo(self.twin)
        self.recorder = BatchRecorder(PROGRAM.machine_id, PROGRAM, BOOK,
                                      EnergyModel.from_twin(CFG.twin, PROGRAM.limits.phase_count))
        self.records: list[BatchRecord] = []
        self.t = 0.0
        self.boot(Controller(PROGRAM, channel=SnapshotChannel()))

    def boot(self, controller: Controller) -> None:
        self.c = controller
        self.sub = controller.channel.subscribe(maxlen=int(60 / PROGRAM.period_s) + 10)

    def run_s(self, seconds: float) -> None:
        left = round(seconds / PROGRAM.period_s)
        while left > 0:
            n = min(left, int(60 / PROGRAM.period_s))
            self.t = run_virtual(self.c, self.io, self.io.advance, n, start_s=self.t)
            for snap in self.sub.drain():
                rec = self.recorder.feed(snap)
                if rec is not None:
                    self.records.append(rec)
            left -= n

    def run_until(self, done, limit_s: float = 4 * 3600, step_s: float = 10.0) -> None:
        end = self.t + limit_s
        while not done() and self.t < end:
            self.run_s(step_s)
        assert done(), f"not reached in {limit_s} s (phase {self.c.state.phase.value})"

    def command(self, cmd) -> None:
        self.c.submit(cmd)
        self.run_s(PROGRAM.period_s)

    def phase(self, name: str):
        return lambda: self.c.state.phase.value == name

    def released(self) -> bool:
        return self.c.state.pouring_released

    def restart(self, down_s: float) -> None:
        """The PLC process dies and comes back ``down_s`` later from its persisted state (the
        twin runs on with every output off meanwhile)."""
        saved = self.c.state.persistent()
        self.io.force_safe()
        self.io.advance(down_s)
        self.t += down_s
        state = replace(restored(json.loads(json.dumps(saved)), PROGRAM.recipes, ZONES),
                        restarted=True)
        self.boot(Controller(PROGRAM, channel=SnapshotChannel(), state=state))


def test_normal_batch_passes():
    line = Line()                          # solid at 22 °C: the whole melt
    line.command(StartRecipe("dark-70", user="op", origin="console"))
    line.run_until(line.released)
    line.command(SetTrim("fountain", 0.2, user="tech"))
    line.run_s(900)
    line.command(Stop(user="op"))
    [rec] = line.records
    assert (rec.verdict, rec.reasons, rec.outcome, rec.first_out) == ("PASS", (), "completed", None)
    assert all(c.passed for c in rec.checks) and len(rec.checks) == 5
    f = rec.figures   # measured: held 68 s, 0.1 K under the cooling goal, 100 % in band
    assert f["heating_held_s"] >= CRITERIA.heating_dwell_s + 15
    assert CRITERIA.cooling_undershoot_k - (27.5 - f["cooling_min_c"]) >= 0.5
    assert f["pouring_in_band_share"] >= 0.99 and f["pouring_max_dev_k"] <= CRITERIA.pouring_band_k
    # released somewhere in run_until's last 10 s step, then 900 s and the Stop
    assert f["above_working_max_s"] == 0.0 and 900.0 <= f["pouring_s"] <= 910.4
    assert [p.phase for p in rec.phases] == ["heating", "cooling", "pouring"]
    assert rec.started_at == 0.0 and rec.ended_at == pytest.approx(rec.phases[-1].end)
    assert sum(p.duration_s for p in rec.phases) == pytest.approx(rec.ended_at - rec.started_at)
    assert {(z.phase, z.zone) for z in rec.zones} == {(p, z) for p in ("heating", "cooling", "pouring")
                                                      for z in ZONES}
    pour = rec.zone_stats("pouring", "fountain")
    assert pour.min_c <= pour.mean_c <= pour.max_c and pour.std_c > 0 and pour.samples > 9000
    assert [(a.user, a.action) for a in rec.actions] == [("op", "StartRecipe"), ("tech", "SetTrim"),
                                                        ("op", "Stop")]
    assert rec.actions[0].detail == "recipe dark-70; via console"
    assert rec.actions[1].detail == "fountain Trim 0 -> 0.2"
    assert rec.started_by == "op" and rec.recipe == RECIPE.model_dump()
    assert rec.criteria == CRITERIA.model_dump() and rec.chocolate_kg == 50.0
    # the melt of 50 kg from 22 °C: sensible + latent heat ~ 50 * (1600 * 26 + 45000) J = 1.2 kWh,
    # plus the losses; the meter sees the motors too and current_total x 3 phases
    assert 1.2 < rec.energy_kwh < 2.5
    assert rec.energy_kwh_per_kg == pytest.approx(rec.energy_kwh / 50.0)
    assert rec.metered_kwh is not None and rec.metered_kwh > rec.energy_kwh
    assert BatchRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    assert line.recorder.current() is None


@pytest.mark.parametrize("fraction, temp_c, verdict", [(0.1, 20.0, "PASS"), (0.5, 10.0, "FAIL")])
def test_cold_top_up_while_pouring(fraction, temp_c, verdict):
    """Seed callets into the tank while pouring: a small charge is absorbed (the pump and
    fountain heaters hold the pouring path in band); half the charge at 10 °C is not."""
    line = Line(initial_temp_c=45.0, solid=False)
    line.command(StartRecipe("dark-70", user="op"))
    line.run_until(line.released)
    line.run_s(120)
    line.twin.add_seed(fraction, temp_c)
    line.run_s(780)
    line.command(Stop(user="op"))
    [rec] = line.records
    assert (rec.verdict, rec.outcome) == (verdict, "completed")
    if verdict == "FAIL":
        [reason] = rec.reasons          # measured: 79 % in band, 1.8 K off at worst
        assert re.fullmatch(r"pouring within ±0\.5 K of 31\.5 °C for (\d+) % of the time "
                            r"\(needs 90 %\)", reason)
        assert int(re.search(r"(\d+) %", reason).group(1)) < 85
        assert any(a.alarm_id.endswith("deviation_error") and a.priority > 0 for a in rec.alarms)
    else:
        assert rec.reasons == () and rec.alarms == ()


def test_batch_aborted_in_cooling_is_incomplete():
    line = Line(initial_temp_c=45.0, solid=False)
    line.command(StartRecipe("dark-70", user="op"))
    line.run_until(line.phase("cooling"))
    line.run_s(100)
    assert line.recorder.current()["phase"] == "cooling"
    assert line.recorder.current()["phase_s"] == pytest.approx(line.c.state.phase_time_s, abs=0.15)
    cooled_s = line.c.state.phase_time_s
    line.command(Abort(user="op"))
    [rec] = line.records
    assert (rec.verdict, rec.outcome) == ("INCOMPLETE", "aborted")
    assert rec.reasons == ("aborted in cooling",)
    checks = {c.name: c for c in rec.checks}
    assert checks["heating"].passed and "held" in checks["heating"].text
    assert checks["cooling"].text == "cooling: not judged (the batch ended in cooling)"
    assert [p.phase for p in rec.phases] == ["heating", "cooling"]
    assert rec.phases[-1].duration_s == pytest.approx(cooled_s + PROGRAM.period_s, abs=0.15)


def test_trip_fails_with_the_first_out():
    line = Line(initial_temp_c=45.0, solid=False)
    line.command(StartRecipe("dark-70", user="op"))
    line.run_s(60)
    line.twin.set_temperature("pump", 70.0)
    line.run_until(line.phase("fault"), limit_s=60, step_s=1)
    [rec] = line.records
    assert (rec.verdict, rec.outcome) == ("FAIL", "tripped")
    assert rec.first_out == line.c.state.first_out == "zone.pump.over_temp"
    assert rec.reasons == ("tripped: first-out zone.pump.over_temp",)
    assert any(a.alarm_id == rec.first_out for a in rec.alarms)
    assert rec.checks[0] == Criterion("outcome", False, rec.reasons[0])


def test_restart_during_a_batch_keeps_one_record_with_the_interruption():
    line = Line(initial_temp_c=45.0, solid=False)
    line.command(StartRecipe("dark-70", user="op"))
    line.run_until(line.phase("cooling"))
    line.run_s(120)
    before = line.recorder.current()
    last_seen = line.t - PROGRAM.period_s
    line.restart(down_s=90.0)
    line.run_s(30)                               # back up, interrupted, outputs safe
    assert line.c.state.interrupted and line.recorder.current()["interrupted"]
    assert line.recorder.current()["phase_s"] == pytest.approx(before["phase_s"], abs=0.2)
    resumed_at = line.t
    line.command(Resume(user="op"))
    line.run_until(line.released)
    line.run_s(300)
    line.command(Stop(user="op"))
    [rec] = line.records
    assert rec.batch_id == before["batch_id"] == line.c.state.batch_id
    [gap] = rec.interruptions
    assert gap.phase == "cooling"
    assert gap.start == pytest.approx(last_seen) and gap.end == pytest.approx(resumed_at)
    assert gap.gap_s == pytest.approx(90.0 + 30.0 + PROGRAM.period_s, abs=0.05)
    assert [p.phase for p in rec.phases] == ["heating", "cooling", "pouring"]
    cooling = rec.phases[1]
    assert cooling.duration_s == pytest.approx(cooling.end - cooling.start - gap.gap_s, abs=0.2)
    assert [a.action for a in rec.actions] == ["StartRecipe", "Resume", "Stop"]
    assert rec.outcome == "completed" and rec.verdict in ("PASS", "FAIL")
