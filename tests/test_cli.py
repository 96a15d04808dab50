"""The command line and the README: every command the README shows is executed here."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    lines = [ln.split("  #")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith(".venv/bin/")]


def run(cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    argv[0] = str(BIN / Path(argv[0]).name)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_readme_shows_commands():
    cmds = readme_commands()
    assert any("check-config" in c for c in cmds) and any("bench.control" in c for c in cmds)


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command_runs(cmd):
    p = run(cmd)
    assert p.returncode == 0, p.stderr + p.stdout
    if "--json" in cmd:
        result = json.loads(p.stdout.strip().splitlines()[-1])
        assert result, "the JSON object is empty"
    if "simulate" in cmd:
        assert "pouring_released" in p.stdout and "final phase stopped" in p.stdout
        verdict = re.search(r"batch (\S+) \(dark-70\) completed: PASS\n.*\n  report: (\S+\.png)", p.stdout)
        assert verdict, p.stdout                   # its record, its verdict and its report
        assert (ROOT / verdict.group(2)).stat().st_size > 50_000
    if " run " in cmd:
        assert "outputs safe (all off)" in p.stdout


def test_check_config_error_matches_the_readme_example(tmp_path):
    example = re.search(r"```\n(config/tempering-machine.yaml: .*?)\n```", README).group(1)
    src = (ROOT / "config" / "tempering-machine.yaml").read_text()
    pump = src.index("\n  pump:\n")
    kp = src.index("kp:", pump)
    end = src.index("\n", kp)
    bad = src[:kp] + "kp: -1" + src[end:]
    d = tmp_path / "config"
    d.mkdir()
    (d / "tempering-machine.yaml").write_text(bad)
    (d / "recipes.yaml").write_text((ROOT / "config" / "recipes.yaml").read_text())
    p = subprocess.run([str(BIN / "tempering"), "check-config", "config/tempering-machine.yaml"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [example]


def test_check_config_reports_every_problem_and_exits_nonzero(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("machine: {id: x}\nzones: 3\n")
    p = run(f".venv/bin/tempering check-config {f}")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) >= 3 and all(ln.startswith(f"{f}: ") for ln in lines)
    assert any("zones" in ln for ln in lines) and "Traceback" not in p.stderr


def test_run_stops_cleanly_on_sigterm_with_outputs_safe(tmp_path):
    from opcua_server.config import load
    from opcua_server.records import Records

    cfg, _ = load()
    settings = cfg.opcua.model_copy(update={"data_dir": str(ROOT / cfg.opcua.data_dir)})
    records = Records(settings.records_url)
    try:          # a new state file: the batch continues the numbering of the records
        first = records.next_batch_seq(cfg.machine.id)
    finally:
        records.close()
    state = tmp_path / "state.json"
    p = subprocess.Popen([str(BIN / "tempering"), "run", "--state-file", str(state),
                          "--initial-temp-c", "45"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        # wait for the batch to start (the console prints events as lines when not a tty)
        line = ""
        while "batch_start" not in line:
            line = p.stdout.readline()
            assert line, p.stderr.read()
        p.terminate()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "outputs safe (all off)" in out and "phase stopped" in out
    saved = json.loads(state.read_text())
    assert saved["phase"] == "stopped" and saved["batch_seq"] == first


# --------------------------------------------------------------------------- batches


@pytest.fixture
def batches_dir(tmp_path):
    """A records database in ``tmp_path/opcua`` with five batches of the last ten hours."""
    import time as _time

    from batch_samples import record
    from opcua_server.records import Records

    now = _time.time()
    r = Records(f"sqlite:///{tmp_path / 'opcua' / 'tempering.db'}")
    verdicts = ["PASS", "FAIL", "PASS", "INCOMPLETE", "PASS"]
    for i, v in enumerate(verdicts, start=1):    # batch i started 2 * (6 - i) hours ago
        reasons = {"FAIL": ("pouring within ±0.5 K of 31.5 °C for 80 % of the time (needs 90 %)",),
                   "INCOMPLETE": ("stopped in cooling, before pouring",)}.get(v, ())
        r.save_batch(record(i, start_s=now - (6 - i) * 7200, verdict=v, reasons=reasons,
                            outcome="stopped" if v == "INCOMPLETE" else "completed"))
    r.close()
    return tmp_path / "opcua"


def batches(data_dir, *argv: str) -> int:
    """``tempering batches ARGV --data-dir DIR``; list and export of every machine's batches (the
    samples are tm-1's, the config's machine is tempering-01)."""
    from tempering.cli import main

    every = ["--all-machines"] if argv[:1] in (("list",), ("export",)) else []
    return main(["batches", *argv, "--data-dir", str(data_dir), *every])


def test_batches_list_prints_a_table_json_and_selects(batches_dir, capsys):
    assert batches(batches_dir, "list") == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["batch", "recipe", "started", "duration", "outcome", "verdict", "reasons"]
    assert [ln.split()[0] for ln in lines] == [f"tm-1-00000{i}" for i in range(1, 6)]
    assert lines[1].split()[4:8] == ["1:30:00", "completed", "FAIL", "pouring"]   # started: 2 words
    assert lines[0].split()[3].endswith("Z") and lines[0].rstrip().endswith("-")
    assert batches(batches_dir, "list", "--json", "--verdict", "PASS", "--since", "7h") == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["batch_id"] for r in rows] == ["tm-1-000003", "tm-1-000005"]
    assert rows[0]["started_at"].endswith("Z") and rows[0]["duration_s"] == 5400.0
    assert set(rows[0]) == {"batch_id", "machine", "recipe_id", "started_at", "ended_at",
                            "duration_s", "outcome", "verdict", "reasons"}
    assert batches(batches_dir, "list", "--json", "--limit", "2", "--until", "1h") == 0
    assert [json.loads(ln)["batch_id"] for ln in capsys.readouterr().out.splitlines()] == [
        "tm-1-000004", "tm-1-000005"]
    assert batches(batches_dir, "list", "--verdict", "FAIL", "--since", "1h") == 0
    assert capsys.readouterr().out.strip() == "no batch records match"


def test_batches_show_prints_the_whole_record(batches_dir, capsys):
    assert batches(batches_dir, "show", "tm-1-000002") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["batch", "tm-1-000002", "machine", "tm-1", "recipe", "dark"]
    assert lines[1].startswith("started ") and lines[1].endswith("(1:30:00): completed")
    assert lines[2] == "verdict FAIL"
    assert lines[3] == "  - pouring within ±0.5 K of 31.5 °C for 80 % of the time (needs 90 %)"
    for part in ("checks", "phases", "zones (°C", "interruptions", "alarms", "operator actions"):
        assert f"\n{part}" in out
    assert "  FAILED  pouring_band" in out and "  ok      heating" in out
    assert "heating  " in out and "0:30:00" in out and "zone.tank.deviation" in out
    assert "olga  SetTrim" in out
    assert "energy 12.50 kWh (rated), 40 kg of chocolate, 0.312 kWh/kg" in out
    assert batches(batches_dir, "show", "tm-1-000002", "--json") == 0
    from opcua_server.batches import BatchRecord
    rec = BatchRecord.from_dict(json.loads(capsys.readouterr().out))
    assert rec.batch_id == "tm-1-000002" and rec.verdict == "FAIL"


def test_batches_export_writes_a_csv_a_spreadsheet_opens(batches_dir, tmp_path, capsys):
    import csv

    out = tmp_path / "batches.csv"
    assert batches(batches_dir, "export", "--csv", str(out), "--since", "9h") == 0
    assert capsys.readouterr().out.strip() == f"{out}: 4 batches"
    raw = out.read_bytes()
    assert raw.startswith(b"batch_id,machine,recipe_id,started_at,") and b"\r\n" in raw
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))
    assert [r["batch_id"] for r in rows] == [f"tm-1-00000{i}" for i in range(2, 6)]
    fail = rows[0]
    assert fail["verdict"] == "FAIL" and "±0.5 K" in fail["reasons"] and "°C" in fail["reasons"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fail["started_at"])
    assert (fail["duration_s"], fail["heating_s"], fail["pouring_s"], fail["energy_kwh"],
            fail["energy_kwh_per_kg"], fail["pouring_in_band_share"], fail["alarms"],
            fail["interruptions"], fail["first_out"]) == (
        "5400", "1800", "2400", "12.5", "0.3125", "0.97", "1", "1", "")
    assert batches(batches_dir, "export", "--csv", str(out), "--verdict", "INCOMPLETE") == 0
    assert [r["outcome"] for r in csv.DictReader(out.read_text().splitlines())] == ["stopped"]


@pytest.mark.parametrize("argv, message", [
    (("list", "--since", "yesterday"), "argument --since: expected an ISO 8601 time"),
    (("list", "--verdict", "pass"), "argument --verdict: invalid choice: 'pass'"),
    (("list", "--limit", "0"), "argument --limit: expected a whole number >= 1, got '0'"),
    (("show",), "the following arguments are required: ID"),
    (("export", "--since", "1h"), "the following arguments are required: --csv"),
    (("export", "--csv", "x.csv", "--until", "2026-02-30"), "got '2026-02-30'"),
])
def test_batches_refuse_bad_arguments(tmp_path, capsys, argv, message):
    from tempering.cli import main

    with pytest.raises(SystemExit) as e:
        main(["batches", *argv, "--data-dir", str(tmp_path / "opcua")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []                     # nothing opened, nothing written


@pytest.mark.parametrize("argv, message", [
    (("list", "--since", "1h", "--until", "2h"), "--since"),
    (("export", "--csv", "{tmp}/out.csv", "--since", "1h", "--until", "2h"), "must be before --until"),
    (("export", "--csv", "{tmp}/no/such/dir/out.csv"), "no directory"),
    (("export", "--csv", "{tmp}"), "it is a directory"),
    (("show", "tm-1-000099"), "no batch record 'tm-1-000099'"),
])
def test_batches_refuse_what_cannot_be_done(batches_dir, tmp_path, capsys, argv, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert batches(batches_dir, *(a.format(tmp=tmp_path) for a in argv)) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before     # nothing written
