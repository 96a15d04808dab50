"""tempering migrate / export-legacy: the legacy machine's seven CSV files to a machine directory
and back.

The shipped set (config/legacy: the default machine as the old system exported it, in the
formats real exports have: a BOM, Windows-1252, ';' with decimal commas, CRLF, quoted fields)
migrates to a machine that check-config accepts, that runs a batch on the twin, and whose users
log in over OPC UA; each class of broken input gives its file:line: column message and writes
nothing; a migration is idempotent; migrating an export gives back the same machine.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opcua_server import records as records_module
from opcua_server.config import load
from tempering import migrate as migrate_module
from tempering.migrate_cli import write
from tempering.legacy_csv import decode
from tempering.migrate import MACHINE_FILE, MAP_FILE, ONE_TIME_FILE, RECIPES_FILE, REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LEGACY = ROOT / "config" / "legacy"
FAST_SCRYPT = records_module.ScryptCost(2 ** 12, 8, 1)


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    monkeypatch.setattr(records_module, "SCRYPT_COST", FAST_SCRYPT)


def tempering(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tempering"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def legacy_copy(tmp_path: Path) -> Path:
    target = tmp_path / "legacy"
    shutil.copytree(LEGACY, target)
    return target


def edit(path: Path, old: str, new: str, encoding: str = "utf-8") -> None:
    text = path.read_bytes().decode(encoding)
    assert old in text, (path.name, old)
    path.write_bytes(text.replace(old, new, 1).encode(encoding))


def problems_of(legacy: Path, tmp_path: Path) -> list[str]:
    out = tmp_path / "out" / "m1"
    p = tempering("migrate", legacy, "--out", out)
    assert p.returncode == 1, p.stdout + p.stderr
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []     # no stage left either
    lines = p.stderr.strip().splitlines()
    assert lines[-1].endswith("problem(s); nothing written")
    return lines[:-1]


# --------------------------------------------------------------------------- the shipped set


def test_the_shipped_set_migrates_to_a_valid_machine_with_its_report(tmp_path):
    out = tmp_path / "tempering-01"
    m = migrate_module.plan(LEGACY, machine_id="tempering-01")
    made = write(m, out)
    cfg, book = load(out / MACHINE_FILE)
    default, default_book = load()
    # the default machine, as the old system exported it, comes back as the default machine
    for section in ("machine_config", "system", "error_settings", "zones"):
        assert getattr(cfg, section) == getattr(default, section), section
    assert cfg.scan.period_ms is None and cfg.period_ms == default.period_ms == 100
    assert cfg.fieldbus.points == default.fieldbus.points
    assert book.recipes == default_book.recipes
    assert cfg.fieldbus.links["io"].transport == "rtu" and cfg.fieldbus.links["io"].device == "/dev/ttyUSB0"
    assert cfg.machine.id == "tempering-01" and cfg.machine.work_dir == "."
    assert cfg.opcua.records_url == f"sqlite:///{out.resolve() / 'var/opcua/tempering.db'}"

    report = (out / REPORT_FILE).read_text()
    for line in ("Recipe.csv           3 record(s) used, 1 skipped  (Windows-1252, ';' separated)",
                 "Machine.csv          1 record(s) used, 0 skipped  (UTF-8 with BOM, ',' separated)",
                 "Mapping.csv         25 record(s) used, 1 skipped  (UTF-8, ',' separated)",
                 "Machine.csv:2: PhaseTolerance: absent -> machine_config.phase_tolerance 0.3 (the default machine's)",
                 "Recipe.csv:2: WorkingMax: absent -> recipes.dark-70.working_max 34.5 (the pouring goal + 3.0 K, at most the heating goal)",
                 "Recipe.csv:2: PedalOnTime: 3000 ms -> pedal_on_time 3.0 s",
                 "Recipe.csv:2: CoolingGoal: decimal comma '27,5' -> 27.5",
                 "Recipe.csv:3: PedalMode: 0 -> manual",
                 "Screen.csv:2: Parity: 0 -> none",
                 "Mapping.csv:14: BitNumbers: '0|1' -> bits [0, 1]",
                 "Recipe.csv:5: recipe 'Ruby test': inactive (IsActive 0)",
                 "Users.csv:5: user 'temp.2021': inactive (IsActive 0)",
                 "Mapping.csv:27: spare_contact: inactive (IsActive 0)",
                 "Screen.csv: Brightness: the old panel's display setting (80); no counterpart here",
                 "Users.csv:2: operator1 (operator): hashed with scrypt",
                 "Users.csv:4: jan (admin): bcrypt hash: cannot be verified here"):
        assert line in report, line

    # the users: plain hashed, ASP.NET Identity kept and verified once, bcrypt -> one-time
    assert [name for name, _ in made] == ["jan"]
    secret = out / "var" / "opcua" / ONE_TIME_FILE
    assert secret.stat().st_mode & 0o777 == 0o600
    assert f"jan {made[0][1]}" in secret.read_text()
    records = records_module.Records(cfg.opcua.records_url)
    try:
        assert dict(records.list_users()) == {"jan": "admin", "operator1": "operator", "tech.maria": "technician"}
        assert records.check_password("operator1", "Choco-2019") == "operator"
        assert records.check_password("tech.maria", "Temper!ng-42") == "technician"
        assert records_module.hash_cost(_hash_of(records, "tech.maria")) is not None   # now scrypt
        assert records.check_password("jan", made[0][1]) == "admin"
        assert records.must_change("jan") and not records.must_change("operator1")
        assert "Choco-2019" not in _hash_of(records, "operator1")
        assert set(records.load_recipes()) == {"dark-70", "milk-35", "white-28"}
    finally:
        records.close()


def _hash_of(records, name: str) -> str:
    from sqlalchemy import select

    with records.engine.connect() as db:
        return db.scalar(select(records_module.users.c.password_hash)
                         .where(records_module.users.c.name == name))


def test_the_migrated_machine_runs_a_batch_on_the_twin(tmp_path):
    out = tmp_path / "tempering-07"
    p = tempering("migrate", LEGACY, "--out", out)
    assert p.returncode == 0, p.stderr
    assert "machine id tempering-07" in p.stdout
    p = tempering("check-config", out / MACHINE_FILE)
    assert p.returncode == 0 and "3 recipes" in p.stdout, p.stdout + p.stderr
    p = tempering("simulate", "--config", out / MACHINE_FILE, "--recipe", "milk-35", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "batch tempering-07-000001 (milk-35) completed: PASS" in p.stdout
    # the batch record went to the migrated machine's own records (machine.work_dir)
    p = tempering("batches", "list", "--config", out / MACHINE_FILE, cwd=tmp_path)
    assert "tempering-07-000001" in p.stdout, p.stdout + p.stderr


def test_the_migrated_machine_serves_its_users_over_opcua(tmp_path, opcua_pki):
    from conftest import find_free_port
    from runs import TemperingRun

    from opcua_server.security import Pki

    out = tmp_path / "machines" / "tempering-02"
    modbus = find_free_port()
    p = tempering("migrate", LEGACY, "--out", out, "--fieldbus", f"tcp:127.0.0.1:{modbus}")
    assert p.returncode == 0, p.stderr
    machine = out / MACHINE_FILE
    edit(machine, "opc.tcp://127.0.0.1:4840", opcua_pki.settings.endpoint)
    pki = Pki(out / "var" / "opcua" / "pki")
    pki.trust(opcua_pki.client_cert)
    opcua_pki.pki = pki                      # the client now checks the migrated machine's certificate
    with TemperingRun(machine, "--no-start") as run:
        run.wait_for(r"opc ua: serving", 90)

        async def logins():
            async with await opcua_pki.client("operator1", "Choco-2019") as op:
                ns = await op.get_namespace_index("urn:open-tempering:machine:tempering-02")
                recipes = await op.get_node(f"ns={ns};s=Machine.Recipes").get_children()
                names = sorted([(await r.read_browse_name()).Name for r in recipes])
            async with await opcua_pki.client("tech.maria", "Temper!ng-42"):
                pass
            refused = await opcua_pki.client("operator1", "wrong-password")
            with pytest.raises(Exception):
                async with refused:
                    pass
            return names

        assert {"dark-70", "milk-35", "white-28"} <= set(asyncio.run(logins()))
        before = machine.read_bytes()
        p = tempering("migrate", LEGACY, "--out", out, "--force")      # not under a running machine
        assert p.returncode == 1 and "the machine is running" in p.stderr, p.stderr
        assert "nothing written" in p.stderr and machine.read_bytes() == before
    p = tempering("users", "list", "--config", machine, cwd=tmp_path)
    assert "jan" in p.stdout and "(must set a new password)" in p.stdout, p.stdout


def test_dry_run_prints_everything_and_writes_nothing(tmp_path):
    out = tmp_path / "m1"
    p = tempering("migrate", LEGACY, "--out", out, "--dry-run")
    assert p.returncode == 0, p.stderr
    for name in (MACHINE_FILE, MAP_FILE, RECIPES_FILE, REPORT_FILE):
        assert f"===== {out / name}" in p.stdout
    assert "Defaults filled in for missing fields" in p.stdout and "(dry run: nothing written)" in p.stdout
    assert not out.exists()


def test_a_migration_is_idempotent_and_force_keeps_the_records(tmp_path):
    out = tmp_path / "m1"
    assert tempering("migrate", LEGACY, "--out", out).returncode == 0
    first = {n: (out / n).read_bytes() for n in (MACHINE_FILE, MAP_FILE, RECIPES_FILE, REPORT_FILE)}
    cfg, _ = load(out / MACHINE_FILE)
    records = records_module.Records(cfg.opcua.records_url)
    records.audit("admin", "write", "Machine.Recipe", "a", "b", "Good", 1.7e9)
    records.add_user("qa.lead", "long-enough-1", "technician")
    records.close()

    p = tempering("migrate", LEGACY, "--out", out)            # again, without --force: refused
    assert p.returncode == 1 and "--force" in p.stderr and "nothing written" in p.stderr
    assert {n: (out / n).read_bytes() for n in first} == first
    p = tempering("migrate", LEGACY, "--out", out, "--force")
    assert p.returncode == 0, p.stderr
    assert {n: (out / n).read_bytes() for n in first} == first          # the same output
    records = records_module.Records(cfg.opcua.records_url)
    try:
        assert [e["target"] for e in records.audit_entries()] == ["Machine.Recipe"]   # kept
        assert dict(records.list_users()) == {"jan": "admin", "operator1": "operator",
                                              "tech.maria": "technician", "qa.lead": "technician"}
    finally:
        records.close()
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []   # no stage left


def test_an_output_directory_that_is_not_a_machine_is_left_alone(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    p = tempering("migrate", LEGACY, "--out", out, "--force")
    assert p.returncode == 1 and "not a machine directory" in p.stderr
    assert [f.name for f in out.iterdir()] == ["holiday.jpg"]


def test_into_postgresql(tmp_path, postgresql_url):
    out = tmp_path / "m1"
    m = migrate_module.plan(LEGACY, machine_id="m1", database_url=postgresql_url)
    write(m, out)
    cfg, _ = load(out / MACHINE_FILE)
    assert cfg.opcua.database_url == postgresql_url
    assert not (out / "var" / "opcua" / "tempering.db").exists()
    records = records_module.Records(postgresql_url)
    try:
        assert records.check_password("operator1", "Choco-2019") == "operator"
        assert set(records.load_recipes()) == {"dark-70", "milk-35", "white-28"}
    finally:
        records.close()


# --------------------------------------------------------------------------- formats


def test_formats_of_real_exports(tmp_path):
    """Every file re-written as ';'-separated Windows-1252 with decimal commas and CRLF, or as
    UTF-8 with a BOM and LF: the same machine."""
    reference = migrate_module.plan(LEGACY, machine_id="m")
    for variant in ("semicolon-cp1252", "bom-lf"):
        legacy = tmp_path / variant
        legacy.mkdir()
        for name in migrate_module.FILES:
            text, _ = decode(name, (LEGACY / name).read_bytes())
            table = list(csv.reader(io.StringIO(text, newline=""),
                                    delimiter=";" if ";" in text.split("\n", 1)[0] else ","))
            buffer = io.StringIO()
            if variant == "semicolon-cp1252":
                table = [[cell.replace(".", ",") if _decimal(cell) else cell for cell in row] for row in table]
                csv.writer(buffer, delimiter=";", lineterminator="\r\n").writerows(table)
                (legacy / name).write_bytes(buffer.getvalue().encode("cp1252"))
            else:
                csv.writer(buffer, delimiter=",", lineterminator="\n").writerows(table)
                (legacy / name).write_bytes(b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8"))
        m = migrate_module.plan(legacy, machine_id="m")
        assert m.machine_yaml.split("\n", 1)[1] == reference.machine_yaml.split("\n", 1)[1], variant
        assert m.recipes == reference.recipes, variant
        assert m.map_yaml.split("\n", 1)[1] == reference.map_yaml.split("\n", 1)[1], variant


def _decimal(cell: str) -> bool:
    return bool(re.match(r"^-?[0-9]+\.[0-9]+$", cell))


# --------------------------------------------------------------------------- broken sets


def _second_machine_record(legacy: Path) -> None:
    with open(legacy / "Machine.csv", "ab") as f:
        f.write(b"2,50,50,26,65,5,2,60,10,60,60,60,0,0,0,0\r\n")


def _truncate(legacy: Path) -> None:
    data = (legacy / "ErrorSettings.csv").read_bytes()
    (legacy / "ErrorSettings.csv").write_bytes(data[:-20])


BROKEN = {
    "a second record in a single-record file": (
        _second_machine_record,
        ["Machine.csv:3: Id: a second record (Machine.csv holds one record, Id 1; the first is on line 2) (got '2')"]),
    "a recipe breaking tank_max_heat": (
        lambda d: edit(d / "Recipe.csv", "enrobage et moulage;48;", "enrobage et moulage;55;", "cp1252"),
        ["Recipe.csv:2: HeatingGoal: must be <= Machine.csv TankMaxHeat (50.0) (got 55.0)"]),
    "a mapping row naming a point the machine lacks": (
        lambda d: edit(d / "Mapping.csv", "3,temp_pump,", "3,temp_pumpp,"),
        ["Mapping.csv:4: Name: not a point of the PLC I/O contract (plc.contract); did you mean temp_pump? (got 'temp_pumpp')",
         "Mapping.csv: Name: PLC point(s) not mapped: temp_pump (no active row names them)"]),
    "a role outside operator/technician/admin": (
        lambda d: edit(d / "Users.csv", ",Technician,", ",Supervisor,"),
        ["Users.csv:3: Role: must be one of operator, technician, admin (got 'Supervisor')"]),
    "an empty file": (
        lambda d: (d / "Screen.csv").write_bytes(b""),
        ["Screen.csv: file: is empty"]),
    "a truncated file": (
        _truncate,
        ["ErrorSettings.csv:2: row: has 5 fields, the header has 8 (a truncated file?)"]),
    "an unterminated quote": (
        lambda d: edit(d / "Users.csv", '"Line operator, shift A"', '"Line operator, shift A'),
        None),
    "a header only": (
        lambda d: (d / "Machine.csv").write_bytes((d / "Machine.csv").read_bytes().split(b"\r\n")[0] + b"\r\n"),
        ["Machine.csv: file: has a header but no rows"]),
    "a missing file": (
        lambda d: (d / "ErrorSettings.csv").unlink(),
        ["ErrorSettings.csv: missing from {legacy}"]),
    "bytes that are no text": (
        lambda d: (d / "Screen.csv").write_bytes((d / "Screen.csv").read_bytes() + b"\x81\r\n"),
        ["Screen.csv:3: file: neither UTF-8 nor Windows-1252 text (byte 0x81)"]),
    "not a number": (
        lambda d: edit(d / "Recipe.csv", "45;27;29,5", "45;27;2x,5", "cp1252"),
        ["Recipe.csv:3: PouringGoal: must be a number (got '2x,5')"]),
    "a zone without a record": (
        lambda d: edit(d / "Configuration.csv", "heater_fountain;;;1", "heater_fountain;;;0"),
        ["Configuration.csv: ZoneNumber: no active record for zone 4 (fountain)"]),
    "a zone's limits crossed": (
        lambda d: edit(d / "Configuration.csv", "3;Pump;3;60;10;", "3;Pump;3;60;70;"),
        ["Configuration.csv:4: row: min_temp must be < max_temp (got min_temp=70.0, max_temp=60.0)"]),
    "a duplicate recipe Id": (
        lambda d: edit(d / "Recipe.csv", "3;White 28 %", "2;White 28 %", "cp1252"),
        ["Recipe.csv:4: Id: already used on line 3 (got 2)"]),
    "an unknown column": (
        lambda d: edit(d / "Machine.csv", "SetTemp4", "SetTemp5"),
        ["Machine.csv:1: header: unknown column (known: Id, IsActive, Name, DefaultRecipe, TankMaxHeat, "
         "PumpMaxHeat, PumpMinHeat, AbsMaxHeat, AbsMinHeat, PreHeatingTemp, PumpDelay, MixerDelay, HeatingDelay, "
         "CoolingDelay, PouringDelay, SetTemp1, SetTemp2, SetTemp3, SetTemp4, PhaseTolerance, CoolingRampKPerMin, "
         "ReheatRampKPerMin) (got 'SetTemp5')"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_broken_input_gives_its_message_and_writes_nothing(tmp_path, case):
    legacy = legacy_copy(tmp_path)
    change, expected = BROKEN[case]
    change(legacy)
    problems = problems_of(legacy, tmp_path)
    if expected is None:                    # the csv module's wording; the file, line and hint are ours
        assert len(problems) == 1 and problems[0].startswith("Users.csv:") and "(a truncated file?)" in problems[0]
    else:
        assert problems == [e.format(legacy=legacy) for e in expected]


def test_every_problem_of_every_file_at_once(tmp_path):
    legacy = legacy_copy(tmp_path)
    for case in ("a second record in a single-record file", "a mapping row naming a point the machine lacks",
                 "a role outside operator/technician/admin", "a truncated file", "not a number",
                 "a zone's limits crossed"):
        BROKEN[case][0](legacy)
    problems = problems_of(legacy, tmp_path)
    assert [p.split(":")[0] for p in problems] == [
        "Machine.csv", "Configuration.csv", "ErrorSettings.csv", "Recipe.csv", "Mapping.csv", "Mapping.csv",
        "Users.csv"]


def test_single_record_files_hold_id_1(tmp_path):
    legacy = legacy_copy(tmp_path)
    edit(legacy / "ErrorSettings.csv", "\r\n1,50.0", "\r\n7,50.0")
    assert problems_of(legacy, tmp_path) == [
        "ErrorSettings.csv:2: Id: must be 1 (ErrorSettings.csv holds one record) (got '7')"]


# --------------------------------------------------------------------------- export-legacy


def test_migrating_an_export_gives_back_the_same_machine(tmp_path):
    a, exported, b = tmp_path / "a" / "m1", tmp_path / "exported", tmp_path / "b" / "m1"
    assert tempering("migrate", LEGACY, "--out", a).returncode == 0
    p = tempering("export-legacy", exported, "--config", a / MACHINE_FILE)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in exported.iterdir()) == sorted(migrate_module.FILES)
    assert (exported / "Recipe.csv").read_bytes().startswith(b"\xef\xbb\xbfId,Code,Name,")
    assert b"\r\n" in (exported / "Machine.csv").read_bytes()
    p = tempering("migrate", exported, "--out", b)
    assert p.returncode == 0, p.stderr
    for name in (MACHINE_FILE, MAP_FILE, RECIPES_FILE):      # the same but the source named in line 1
        assert (a / name).read_text().split("\n", 1)[1] == (b / name).read_text().split("\n", 1)[1], name
    assert "# legacy Recipe.csv Id 2: Lait 35 % – pédale manuelle" in (b / RECIPES_FILE).read_text()
    users = {}
    for side in (a, b):
        cfg, _ = load(side / MACHINE_FILE)
        records = records_module.Records(cfg.opcua.records_url)
        try:
            users[side] = {n: (_hash_of(records, n), records.must_change(n)) for n, _ in records.list_users()}
        finally:
            records.close()
    assert users[a] == users[b]                  # the same hashes, the same pending changes


def test_export_refuses_a_folder_with_files(tmp_path):
    target = tmp_path / "legacy-out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    p = tempering("export-legacy", target)
    assert p.returncode == 1 and "--force" in p.stderr
    assert [f.name for f in target.iterdir()] == ["notes.txt"]
