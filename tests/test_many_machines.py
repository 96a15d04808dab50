"""Many machines, shared servers: machines writing to one records database (SQLite here, a
real PostgreSQL) keep their audit, alarm journal and batch rows apart by machine id; recipe
books are a machine's own or a plant library; the schema version is checked at open (older:
migrated, newer: refused with a message, nothing written). Then three ``tempering run`` against
one PostgreSQL and one InfluxDB 1.x, checked for rows and points mixed or lost."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sqlalchemy import MetaData, Table, create_engine, inspect, insert, select, text

import opcua_server.records as records_module
from opcua_server.batches import BatchRecord
from opcua_server.records import Records, SchemaTooNew, book_of, check_schema
from plc.commands import Event
from plc.config import RecipeBook

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records' / 'tempering.db'}"
    return request.getfixturevalue("postgresql_url")


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr(records_module, "SCRYPT_COST", records_module.ScryptCost(2 ** 10, 8, 1))


def restart(time_s: float) -> Event:
    return Event("alarm_system", time_s, "PLC started", (("transition", "restart"),))


def batch(machine: str, seq: int, started: float = 1.7e9) -> BatchRecord:
    return BatchRecord(batch_id=f"{machine}-{seq:06d}", machine_id=machine, recipe_id="dark-70",
                       recipe={}, recipe_hash="", started_at=started, ended_at=started + 60,
                       started_by="op", outcome="completed", first_out=None, interruptions=(),
                       phases=(), zones=(), alarms=(), actions=(), energy_kwh=1.0,
                       energy_kwh_per_kg=None, metered_kwh=None, chocolate_kg=None, criteria={},
                       verdict="PASS", reasons=(), checks=())


BOOK = RecipeBook.model_validate(yaml.safe_load((ROOT / "config" / "recipes.yaml").read_text()))


# --------------------------------------------------------------------------- the contract


def test_each_machine_writes_and_reads_its_own_rows(url):
    a, b = Records(url, machine="line-a"), Records(url, machine="line-b")
    plant = Records(url)
    try:
        a.audit("olga", "write", "Machine.Zones.Pump.Trim", 0.0, 0.5, "Good", 1.7e9)
        b.audit("piet", "write", "Machine.Zones.Pump.Trim", 0.0, 0.7, "Good", 1.7e9)
        assert a.journal_alarms([restart(1.7e9)]) == 1
        assert b.journal_alarms([restart(1.7e9)]) == 1      # the same event, another machine: its own row
        a.save_batch(batch("line-a", 1))
        a.save_batch(batch("line-a", 2))
        b.save_batch(batch("line-b", 7))
        assert [(e["user"], e["machine"]) for e in a.audit_entries()] == [("olga", "line-a")]
        assert [(e["user"], e["machine"]) for e in b.audit_entries()] == [("piet", "line-b")]
        assert [r.machine for r in a.alarm_journal()] == ["line-a"]
        assert [r.machine for r in b.alarm_journal()] == ["line-b"]
        assert [s.batch_id for s in a.batches()] == ["line-a-000001", "line-a-000002"]
        assert [s.batch_id for s in b.batches()] == ["line-b-000007"]
        assert a.batch("line-b-000007") is None and b.batch("line-b-000007") is not None
        assert (a.next_batch_seq(), b.next_batch_seq(), a.next_batch_seq("line-b")) == (3, 8, 8)
        # without a machine: the plant's view, every machine's rows
        assert len(plant.audit_entries()) == 2 and len(plant.alarm_journal()) == 2
        assert len(plant.batches()) == 3
        # users are the database's: one account for every machine on it
        a.add_user("olga", "olga-secret-1", "operator")
        assert b.check_password("olga", "olga-secret-1") == "operator"
    finally:
        for r in (a, b, plant):
            r.close()


def test_own_books_stay_apart_and_a_library_is_shared(url):
    own_a, own_b = Records(url, machine="line-a"), Records(url, machine="line-b")
    lib_c = Records(url, machine="line-c", recipe_library="plant")
    lib_d = Records(url, machine="line-d", recipe_library="plant")
    try:
        assert (own_a.book, lib_c.book) == ("machine:line-a", "library:plant") == \
               (book_of("line-a"), book_of("line-d", "plant"))
        assert own_a.seed_recipes(BOOK) == 3 and own_b.seed_recipes(BOOK) == 3
        assert lib_c.seed_recipes(BOOK) == 3 and lib_d.seed_recipes(BOOK) == 0   # seeded once
        milk = own_a.load_recipes()["milk-35"]
        own_a.save_recipe("milk-35", {**milk, "pouring_goal": 29.0})
        lib_c.save_recipe("milk-35", {**milk, "pouring_goal": 30.0})
        lib_d.save_recipe("ruby-1", {**milk, "name": "Ruby"})
        assert own_a.load_recipes()["milk-35"]["pouring_goal"] == 29.0
        assert own_b.load_recipes()["milk-35"]["pouring_goal"] == 29.5          # untouched
        assert lib_d.load_recipes()["milk-35"]["pouring_goal"] == 30.0          # shared edits
        assert "ruby-1" in lib_c.load_recipes() and "ruby-1" not in own_a.load_recipes()
        lib_c.delete_recipe("ruby-1")
        assert "ruby-1" not in lib_d.load_recipes()
        with pytest.raises(records_module.NoSuchRecipe):
            own_b.delete_recipe("ruby-1")
    finally:
        for r in (own_a, own_b, lib_c, lib_d):
            r.close()


def _schema_5(url: str) -> None:
    """A database as schema 5 made it: recipes keyed by id, audit without machine, meta.key 64
    long; a recipe, an audit row, the seeded mark."""
    old = MetaData()
    for table in records_module._metadata.sorted_tables:
        drop = {"recipes": {"book"}, "audit": {"machine"}}.get(table.name, set())
        columns = [c._copy() for c in table.columns if c.name not in drop]
        if table.name == "meta":
            columns[0] = records_module.Column("key", records_module.String(64), primary_key=True)
        Table(table.name, old, *columns)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        old.create_all(engine)
        milk = records_module._recipe_row(BOOK.recipes["milk-35"].model_dump())
        with engine.begin() as db:
            db.execute(insert(old.tables["recipes"]).values(id="milk-35", **{**milk, "pouring_goal": 29.0}))
            db.execute(insert(old.tables["audit"]).values(time="2026-01-01T00:00:00.000Z", user_name="olga",
                                                          action="write", target="x", result="Good"))
            db.execute(text("INSERT INTO meta VALUES ('schema', '5'), ('recipes_seeded', 'then')"))
    finally:
        engine.dispose()


def test_a_schema_5_database_becomes_the_first_machines(url, caplog):
    _schema_5(url)
    first = Records(url, machine="line-a")
    try:
        assert "records schema 5 -> 6" in caplog.text
        assert [e["machine"] for e in first.audit_entries()] == ["line-a"]
        assert first.load_recipes()["milk-35"]["pouring_goal"] == 29.0      # its edited recipe kept
        assert first.seed_recipes(BOOK) == 0                                # seeded before: not again
        first.audit("olga", "write", "y", None, None, "Good", 1.7e9)
        with first.engine.connect() as db:
            assert db.scalar(text("SELECT value FROM meta WHERE key = 'schema'")) == "6"
            keys = {c["name"] for c in inspect(db).get_columns("recipes")}
            assert "book" in keys and inspect(db).get_pk_constraint("recipes")["constrained_columns"] \
                in (["book", "id"], ["id", "book"])
    finally:
        first.close()
    second = Records(url, machine="line-b")
    try:
        assert second.audit_entries() == [] and second.load_recipes() == {}
        assert second.seed_recipes(BOOK) == 3
    finally:
        second.close()


def test_a_newer_database_is_refused_and_left_alone(tmp_path):
    data = tmp_path / "opcua"
    data.mkdir()
    url = f"sqlite:///{data / 'tempering.db'}"
    engine = create_engine(url)
    with engine.begin() as db:
        db.execute(text("CREATE TABLE meta (key VARCHAR(200) PRIMARY KEY, value TEXT NOT NULL)"))
        db.execute(text("INSERT INTO meta VALUES ('schema', '7')"))
    engine.dispose()
    with pytest.raises(SchemaTooNew) as e:
        Records(url, machine="line-a")
    assert (e.value.found, e.value.supported) == ("7", "6")
    assert "has schema 7, newer than this program's schema 6" in str(e.value)
    with pytest.raises(SchemaTooNew):
        check_schema(url)
    check_schema(f"sqlite:///{tmp_path / 'none.db'}")             # nothing there: nothing to say
    assert not (tmp_path / "none.db").exists()
    engine = create_engine(url)
    with engine.connect() as db:
        assert inspect(db).get_table_names() == ["meta"]             # nothing made
    engine.dispose()
    # the commands: a message and an exit code, no traceback
    for argv, code in ((["alarms", "journal", "--data-dir", str(data)], 1),
                       (["batches", "list", "--data-dir", str(data)], 1),
                       (["users", "list", "--data-dir", str(data)], 1)):
        p = subprocess.run([str(BIN / "tempering"), *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == code and "newer than this program's schema 6" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    from runs import machine_dir
    config = machine_dir(tmp_path / "m")
    (tmp_path / "m" / "opcua").mkdir()
    (tmp_path / "m" / "opcua" / "tempering.db").write_bytes((data / "tempering.db").read_bytes())
    p = subprocess.run([str(BIN / "tempering"), "run", "--config", str(config), "--duration-s", "5"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "tempering run: the records database" in p.stderr, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "supervisor" not in p.stdout      # nothing started


# --------------------------------------------------------------------------- three machines

MACHINES = {"line-a": None, "line-b": "plant", "line-c": "plant"}   # id -> opcua.recipe_library
EDITS = {"line-a": 29.0, "line-b": 30.0}       # milk-35's PouringGoal written over OPC UA
SAMPLE_MS = 500
PASSWORD = "boss-secret-12"


def _machine(base: Path, machine: str, library: str | None, url: str, influx, client_cert: Path) -> Path:
    from runs import machine_dir

    from opcua_server.security import Pki

    config = machine_dir(base, database_url=url, recipe_library=library)
    data = yaml.safe_load(config.read_text())
    data["machine"]["id"] = machine
    data["historian"]["sample_interval_ms"] = SAMPLE_MS
    data["historian"]["sink"] = {"kind": "influxdb1", "url": influx.url, "database": influx.database}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    Pki(base / "opcua" / "pki").trust(client_cert)
    return config


async def _find(parent, name: str, depth: int = 3):
    """The node named ``name`` below ``parent`` (browse names, breadth first)."""
    level = [parent]
    for _ in range(depth):
        below = []
        for node in level:
            for child in await node.get_children():
                if (await child.read_browse_name()).Name == name:
                    return node, child
                below.append(child)
        level = below
    raise LookupError(name)


async def _operate(run, machine: str, opcua_pki) -> None:
    """On one machine as the admin: a Trim written, milk-35's PouringGoal written (EDITS),
    the running batch aborted (its record)."""
    from asyncua import ua

    opcua_pki.settings = opcua_pki.settings.model_copy(update={"endpoint": run.endpoint})
    opcua_pki.pki = type(opcua_pki.pki)(run.config.parent.parent / "opcua" / "pki")
    async with await opcua_pki.client("boss", PASSWORD, timeout=20) as client:
        ns = await client.get_namespace_index(f"urn:open-tempering:machine:{machine}")
        trim = client.get_node(ua.NodeId("Machine.Zones.Pump.Trim", ns))
        await trim.write_value(ua.DataValue(ua.Variant(0.5, ua.VariantType.Double)))
        if machine in EDITS:                    # line-c edits nothing: it shares line-b's library
            goal = client.get_node(ua.NodeId("Machine.Recipes.milk-35.PouringGoal", ns))
            await goal.write_value(ua.DataValue(ua.Variant(EDITS[machine], ua.VariantType.Double)))
        owner, abort = await _find(client.get_node(ua.NodeId("Machine", ns)), "Abort")
        await owner.call_method(abort)


def _influx_zone_times(influx, machine: str) -> dict[str, list[int]]:
    out = influx.query(f"SELECT temp_c FROM zone WHERE machine = '{machine}' GROUP BY zone", epoch="ms")
    return {s["tags"]["zone"]: [row[0] for row in s["values"]]
            for s in out["results"][0].get("series", [])}


def test_three_machines_share_one_postgresql_and_one_influxdb(tmp_path, postgresql_url, influxdb1,
                                                              opcua_pki, capsys):
    from runs import TemperingRun

    from tempering.cli import main

    t0 = time.monotonic()
    plant = Records(postgresql_url)
    plant.add_user("boss", PASSWORD, "admin")         # users are plant-wide: one account, three machines
    plant.close()
    configs = {m: _machine(tmp_path / m, m, lib, postgresql_url, influxdb1, opcua_pki.client_cert)
               for m, lib in MACHINES.items()}
    runs = {m: TemperingRun(c, "--plant", "inprocess") for m, c in configs.items()}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        try:
            for run in runs.values():
                run.__enter__()
            for run in runs.values():
                run.wait_for(r"auto-start: StartRecipe dark-70: accepted", 90)
            started = time.time()                 # every machine's historian writes from here on
            for m, run in runs.items():
                asyncio.run(_operate(run, m, opcua_pki))
            for m, run in runs.items():
                run.wait_for(rf"batch {m}-\d+ \(dark-70\) (stopped|aborted|completed)", 30)
            time.sleep(max(0.0, 8.0 - (time.time() - started)))
        finally:
            stopping = time.time()
            codes = list(pool.map(lambda r: r.stop(), runs.values()))
    ran_s = stopping - started
    assert codes == [0, 0, 0], [r.output[-3000:] for r in runs.values()]

    for m, lib in MACHINES.items():
        r = Records(postgresql_url, machine=m, recipe_library=lib)
        try:
            audit = r.audit_entries(1000)
            assert audit and {e["machine"] for e in audit} == {m}
            assert ("boss", "pump.Trim", "Good") in \
                   [(e["user"], e["target"], e["result"].split(":")[0]) for e in audit]
            journal = r.alarm_journal()
            assert journal and {j.machine for j in journal} == {m}
            assert any(j.kind == "restart" for j in journal)
            batches = r.batches()
            assert batches and {b.machine for b in batches} == {m}
            assert all(b.batch_id.startswith(f"{m}-") for b in batches)
            assert r.next_batch_seq() == max(int(b.batch_id[-6:]) for b in batches) + 1
            goal = r.load_recipes()["milk-35"]["pouring_goal"]
            assert goal == (29.0 if lib is None else 30.0), (m, goal)     # b's edit, c's book too
        finally:
            r.close()
        # the commands show the config's machine only; --all-machines every one
        capsys.readouterr()
        assert main(["batches", "list", "--json", "--config", str(configs[m])]) == 0
        assert {json.loads(ln)["machine"] for ln in capsys.readouterr().out.splitlines()} == {m}
        assert main(["alarms", "journal", "--json", "--config", str(configs[m])]) == 0
        assert {json.loads(ln)["machine"] for ln in capsys.readouterr().out.splitlines()} == {m}
    assert main(["alarms", "journal", "--json", "--all-machines", "--config", str(configs["line-a"])]) == 0
    assert {json.loads(ln)["machine"] for ln in capsys.readouterr().out.splitlines()} == set(MACHINES)

    # InfluxDB: each machine's zones under its own tag, a point every SAMPLE_MS from the start
    # to the stop (what the spool held at the stop delivered), no gaps
    expected = ran_s * 1000 / SAMPLE_MS
    counts = {}
    for m in MACHINES:
        zones = _influx_zone_times(influxdb1, m)
        assert set(zones) == {"tank_bottom", "tank_wall", "pump", "fountain"}, (m, set(zones))
        for zone, times in zones.items():
            gaps = [b - a for a, b in zip(times, times[1:])]
            counts[m, zone] = n = sum(1 for t in times if started * 1000 <= t < stopping * 1000)
            assert n >= expected * 0.9, (m, zone, n, expected)
            assert max(gaps) <= 3 * SAMPLE_MS, (m, zone, max(gaps))
    print(f"three machines: ran {ran_s:.1f} s, {min(counts.values())}..{max(counts.values())} points "
          f"per zone in it ({expected:.0f} expected), test {time.monotonic() - t0:.1f} s")
