"""The batch report (opcua_server.report): one page as PNG, PDF and HTML from a record and its
zone history; the history read from the local store and from a real InfluxDB 1.x."""

from __future__ import annotations

import base64
import dataclasses
import re

import numpy as np
import pytest
from matplotlib.image import imread

from batch_samples import T0, record
from historian.local import LocalStore
from historian.schema import line, ns
from opcua_server.report import (PAGE_IN, PNG_DPI, FluxHistory, InfluxQLHistory, StoreHistory,
                                 ZONE_COLOURS, history_for, render)
from plc.contract import ZONES

STEP_S = 10.0


def zone_lines(rec, machine: str | None = None, batch: str | None = None) -> list[str]:
    """Zone lines of the record's batch every STEP_S: each zone heats from 22 to 45 °C, cools
    to 27 °C and holds 31.5 °C while pouring (a zone a little off the next)."""
    out = []
    phases = {p.phase: p for p in rec.phases}
    t = rec.started_at
    while t < rec.ended_at:
        phase = next(p.phase for p in rec.phases if p.start <= t < p.end)
        span = phases[phase]
        x = (t - span.start) / max(1.0, span.end - span.start)
        temp, sp = {"heating": (22 + 23 * min(1.0, 1.5 * x), 45.0),
                    "cooling": (45 - 18 * min(1.0, 1.5 * x), 27.0),
                    "pouring": (31.5 + 0.2 * np.sin(t / 300.0), 31.5)}[phase]
        for i, zone in enumerate(ZONES):
            out.append(line("zone", {"machine": machine or rec.machine_id, "zone": zone,
                                     "phase": phase, "batch": batch or rec.batch_id,
                                     "recipe": rec.recipe_id},
                            {"temp_c": float(temp) + 0.3 * i, "setpoint_c": sp,
                             "output_pct": 50.0, "quality": "good"}, ns(t)))
        t += STEP_S
    return out


@pytest.fixture
def sample(tmp_path):
    rec = dataclasses.replace(
        record(verdict="FAIL", reasons=("pouring within ±0.5 K of 31.5 °C for 80 % of the time "
                                        "(needs 90 %)",), pouring_share=0.8),
        recipe={"name": "Dark <70 %>", "heating_goal": 45.0, "cooling_goal": 27.0,
                "pouring_goal": 31.5, "working_max": 33.0})
    store = LocalStore(tmp_path / "history.sqlite", retention_days=36500)
    store.write_lines(zone_lines(rec))
    # Another batch of the same machine and another machine's batch: never in this report.
    store.write_lines(zone_lines(rec, batch="tm-1-000099")[:40])
    store.write_lines(zone_lines(rec, machine="tm-2")[:40])
    yield rec, store
    store.close()


def test_store_history_gives_one_zone_field_of_the_batch(sample):
    rec, store = sample
    h = StoreHistory(store, rec.machine_id, rec.batch_id)
    temps = h.series("pump", "temp_c", rec.started_at, rec.ended_at)
    assert len(temps) == int((rec.ended_at - rec.started_at) / STEP_S)
    assert temps[0] == (pytest.approx(T0), pytest.approx(22.0 + 0.3 * ZONES.index("pump")))
    assert all(a[0] < b[0] for a, b in zip(temps, temps[1:]))
    window = h.series("pump", "setpoint_c", T0 + 100, T0 + 200)
    assert [t for t, _ in window] == [pytest.approx(T0 + s) for s in (100, 110, 120, 130, 140, 150,
                                                                      160, 170, 180, 190)]


def test_png_is_one_page_of_the_expected_size_and_drawn(sample, tmp_path):
    rec, store = sample
    path = render(rec, StoreHistory(store, rec.machine_id, rec.batch_id), tmp_path / "r.png")
    pixels = imread(path)[..., :3]
    assert pixels.shape[:2] == (int(PAGE_IN[1] * PNG_DPI), int(PAGE_IN[0] * PNG_DPI))   # 1240 x 1753
    ink = (pixels.min(axis=2) < 0.9).mean()
    assert 0.03 < ink < 0.6                      # drawn on, and not a filled rectangle
    # Every zone's colour is on the page (its temperature curve).
    for zone in ZONES:
        rgb = np.array([int(ZONE_COLOURS[zone][i:i + 2], 16) / 255 for i in (1, 3, 5)])
        close = (np.abs(pixels - rgb).max(axis=2) < 0.06).sum()
        assert close > 200, zone
    # The FAIL verdict's red box in the top right corner.
    corner = pixels[:120, -300:]
    red = ((corner[..., 0] > 0.7) & (corner[..., 1] < 0.25) & (corner[..., 2] < 0.25)).sum()
    assert red > 2000


def test_pdf_is_one_page(sample, tmp_path):
    rec, store = sample
    path = render(rec, StoreHistory(store, rec.machine_id, rec.batch_id), tmp_path / "r.pdf")
    data = path.read_bytes()
    assert data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b", data)) == 1


def test_html_has_the_picture_and_the_record_tables(sample, tmp_path):
    rec, store = sample
    path = render(rec, StoreHistory(store, rec.machine_id, rec.batch_id), tmp_path / "r.html")
    text = path.read_text(encoding="utf-8")
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)[1])
    assert png.startswith(b"\x89PNG")
    for part in (rec.batch_id, "FAIL", "Acceptance checks", "Phases", "Zones by phase", "Alarms",
                 "Operator actions", "Interruptions", "zone.tank.deviation", "SetTrim",
                 "80 % of the time", "Dark &lt;70 %&gt;"):
        assert part in text, part
    assert "<70" not in text                    # the record's text is escaped


def test_render_refuses_other_formats(sample, tmp_path):
    rec, store = sample
    with pytest.raises(ValueError, match="png, .pdf or .html"):
        render(rec, StoreHistory(store, rec.machine_id), tmp_path / "r.svg")


def test_influxdb_history_returns_the_series_written(influxdb1, tmp_path):
    rec = record()
    lines = zone_lines(rec)
    influxdb1.write(lines + zone_lines(rec, batch="tm-1-000099")[:40]
                    + zone_lines(rec, machine="tm-2")[:40])
    h = InfluxQLHistory(influxdb1.url, influxdb1.database, rec.machine_id, rec.batch_id)
    local = LocalStore(tmp_path / "check.sqlite", retention_days=36500)
    local.write_lines(lines)
    try:
        want = StoreHistory(local, rec.machine_id, rec.batch_id)
        for zone in ZONES:
            for field in ("temp_c", "setpoint_c"):
                got = h.series(zone, field, rec.started_at, rec.ended_at)
                assert got == want.series(zone, field, rec.started_at, rec.ended_at)
        assert len(got) == int((rec.ended_at - rec.started_at) / STEP_S)
        # The window: start inclusive, end exclusive.
        assert [t for t, _ in h.series("pump", "temp_c", T0 + 100, T0 + 130)] == [
            pytest.approx(T0 + 100), pytest.approx(T0 + 110), pytest.approx(T0 + 120)]
    finally:
        local.close()


def test_history_for_follows_the_historians_sink(tmp_path):
    from historian.config import SinkSettings

    h = history_for(SinkSettings(kind="influxdb1", url="http://127.0.0.1:8086", database="t",
                                 username="u", password="p"), "tm-1", "tm-1-000001")
    assert isinstance(h, InfluxQLHistory)
    assert "\"batch\" = 'tm-1-000001'" in h.query("temp_c", "pump", T0, T0 + 60)
    h = history_for(SinkSettings(kind="influxdb2", url="http://127.0.0.1:8086", org="o",
                                 bucket="b", token="t"), "tm-1", "tm-1-000001")
    assert isinstance(h, FluxHistory)
    assert 'r.batch == "tm-1-000001"' in h.query("temp_c", "pump", T0, T0 + 60)
    h.close()
    h = history_for(SinkSettings(kind="local", path=str(tmp_path / "h.sqlite")), "tm-1")
    assert isinstance(h, StoreHistory) and h.series("pump", "temp_c", T0, T0 + 60) == []
    h.store.close()


def test_cli_report_draws_a_stored_batch_from_the_configured_history(sample, tmp_path,
                                                                     monkeypatch, capsys):
    from opcua_server.records import Records
    from tempering.cli import main

    rec, store = sample
    monkeypatch.chdir(tmp_path)           # the default machine's local store: var/history.sqlite
    (tmp_path / "var").mkdir()
    LocalStore(tmp_path / "var" / "history.sqlite", retention_days=36500).write_lines(
        zone_lines(rec))
    records = Records(f"sqlite:///{tmp_path / 'opcua' / 'tempering.db'}")
    records.save_batch(rec)
    records.close()
    where = ["--data-dir", str(tmp_path / "opcua")]
    assert main(["batches", "report", rec.batch_id, "-o", "r.png", *where]) == 0
    assert capsys.readouterr().out.strip() == "r.png"
    pixels = imread(tmp_path / "r.png")[..., :3]
    assert (pixels.min(axis=2) < 0.9).mean() > 0.03
    assert main(["batches", "report", rec.batch_id, "-o", "r.html", *where]) == 0
    assert rec.batch_id in (tmp_path / "r.html").read_text(encoding="utf-8")

    assert main(["batches", "report", "tm-1-424242", "-o", "x.png", *where]) == 2
    assert "no batch record 'tm-1-424242'" in capsys.readouterr().err
    assert main(["batches", "report", rec.batch_id, "-o", "x.svg", *where]) == 2
    assert ".png, .pdf or .html" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.svg").exists()
