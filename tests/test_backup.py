"""``tempering backup`` and ``tempering restore``: a machine (files, records, PKI, PLC state)
into one archive and back; a restore refused, with its reason and nothing changed, for a
corrupt or tampered archive, a running machine (its batch named), a target that has a machine
(without --force); a failure late in a restore leaves the target as it was; a machine backed up
while it runs, moved to a new directory, serves the same address space; SQLite to PostgreSQL and
back. Machines in temporary directories on free loopback ports; ``tempering run`` as a child
process (``runs.TemperingRun``), ended by PID."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import tarfile
import time
from pathlib import Path

import pytest
from asyncua import ua

from batch_samples import T0, record
from conftest import MACHINE_FILE, find_free_port
from opcua_server import records as records_module
from opcua_server.config import load
from opcua_server.records import Records
from opcua_server.security import Pki
from plc.commands import Event
from plc.persist import write_atomic
from runs import TemperingRun
from tempering import archive as archive_module
from tempering import backup as backup_module
from tempering.cli import main

FAST_SCRYPT = records_module.ScryptCost(2 ** 12, 8, 1)
USERS = {"alice": ("admin", "alice-secret-1"), "olga": ("operator", "olga-secret-1")}
URI = "urn:open-tempering:machine:tempering-01"


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch):
    """Passwords hashed at a low cost (the real one is 0.5 s a hash)."""
    monkeypatch.setattr(records_module, "SCRYPT_COST", FAST_SCRYPT)


def make_machine(directory: Path, **opcua: str) -> Path:
    """The default machine file (with its comments) and its files in ``directory``, with
    ``machine.work_dir: .``, free loopback ports and the ``opcua`` settings given."""
    directory.mkdir(parents=True)
    text = MACHINE_FILE.read_text().replace("machine:\n", "machine:\n  work_dir: .\n", 1)
    text = text.replace("opc.tcp://127.0.0.1:4840", opcua.pop("endpoint", f"opc.tcp://127.0.0.1:{find_free_port()}"))
    text = text.replace("port: 5020", f"port: {find_free_port()}")
    for key, value in opcua.items():
        before = text.index(f"\n  {key}: ", text.index("\nopcua:"))
        end = text.index("#", before)
        text = text[:before] + f"\n  {key}: {json.dumps(value)}   " + text[end:]
    for name in ("recipes.yaml", "register-map.yaml"):
        shutil.copy(MACHINE_FILE.parent / name, directory / name)
    path = directory / "tempering-machine.yaml"
    path.write_text(text)
    load(path)
    return path


def populate(machine: Path, certificates, *, users=USERS, batch: int = 3) -> None:
    """Records (recipes, users, an audit row, journal rows, a batch), the PKI (own certificate,
    a trusted and a rejected client), the PLC state and its recipe book."""
    cfg, book = load(machine)
    r = Records(cfg.opcua.records_url)
    try:
        r.seed_recipes(book)
        for name, (role, password) in users.items():
            r.add_user(name, password, role)
        r.save_recipe("ruby-47", dict(book.recipes["dark-70"].model_dump(), name="Ruby 47 %"))
        r.audit("olga", "write", "Machine.Zones.Pump.Trim", 0.0, 0.5, "Good", T0, command_id="c-1",
                origin="opcua", peer="127.0.0.1:50000", certificate="ab" * 20)
        r.journal_alarms([Event("alarm_system", T0, "PLC started", ()),
                          Event("alarm", T0 + 1, "zone.pump.over_temp: -> active", (
                              ("alarm_id", "zone.pump.over_temp"), ("transition", "active"),
                              ("to", "active"), ("priority", 900), ("value", 63.25),
                              ("batch_id", "tempering-01-000003"), ("recipe_id", "dark-70")))],
                         machine=cfg.machine.id)
        r.save_batch(record(batch, machine=cfg.machine.id, recipe="dark-70", verdict="FAIL",
                            reasons=("pouring within ±0.5 K of 31.5 °C for 80 % of the time",)))
    finally:
        r.close()
    pki = Pki(cfg.opcua.pki_dir)
    pki.ensure_own_certificate(f"urn:open-tempering:server:{cfg.machine.id}", socket.gethostname(), ("127.0.0.1",))
    pki.trust(certificates["trusted-client"][0])
    shutil.copy(certificates["untrusted-client"][0], pki.rejected_dir / "untrusted-client.der")
    state = Path(cfg.machine.state_file)
    write_atomic(state, {"version": 2, "phase": "idle", "recipe_id": "dark-70", "batch_id": None,
                         "batch_seq": batch, "trims": {"pump": 0.5}, "alarms": {}})
    write_atomic(state.with_suffix(".recipes.json"), {"dark-70": book.recipes["dark-70"].model_dump()})


def tree(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file below ``directory``: relative path -> bytes (names ending in ``skip`` left out)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.endswith(skip)}


def rows(url: str) -> dict[str, list[dict]]:
    """Every row of every table of the records at ``url``, in primary-key order."""
    from sqlalchemy import create_engine, select

    engine = create_engine(url)
    try:
        with engine.connect() as db:
            return {t.name: [dict(r) for r in db.execute(select(t).order_by(*t.primary_key.columns)).mappings()]
                    for t in records_module.users.metadata.sorted_tables}
    finally:
        engine.dispose()


def records_url(machine: Path) -> str:
    return load(machine)[0].opcua.records_url


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- round trips


def test_backup_wipe_restore_gives_back_the_same_machine(tmp_path, capsys, opcua_client_certificates):
    machine = make_machine(tmp_path / "m")
    populate(machine, opcua_client_certificates)
    url = records_url(machine)
    before_rows, before_files = rows(url), tree(machine.parent, skip=("tempering.db",))
    archive = tmp_path / "backups" / "m.tgz"
    code, out, err = run_cli(capsys, "backup", archive, "--config", machine, "--include-keys")
    assert code == 0, err
    assert "users 2" in out and "audit 1" in out and "alarm_journal 2" in out and "batches 1" in out
    assert "own certificate and private key; 1 trusted, 1 rejected" in out and "(phase idle)" in out
    assert archive.stat().st_mode & 0o777 == 0o600
    shutil.rmtree(machine.parent)                         # the machine is gone, files and all

    code, out, err = run_cli(capsys, "restore", archive, "--config", machine)
    assert code == 0, err
    assert "own certificate and private key restored" in out and "users 2" in out
    assert rows(url) == before_rows                       # every table, every row, every column
    assert tree(machine.parent, skip=("tempering.db",)) == before_files   # files, PKI, state
    r = Records(url)
    try:
        for name, (role, password) in USERS.items():
            assert r.check_password(name, password) == role
        assert r.alarm_journal()[1].value == 63.25 and r.batch("tempering-01-000003").verdict == "FAIL"
        assert r.load_recipes()["ruby-47"]["name"] == "Ruby 47 %"
    finally:
        r.close()


def test_the_private_key_only_with_include_keys_and_the_archive_always_0600(tmp_path, capsys,
                                                                              opcua_client_certificates):
    machine = make_machine(tmp_path / "m")
    populate(machine, opcua_client_certificates)
    own = machine.parent / "var" / "opcua" / "pki" / "own"
    for keys in (True, False):
        archive = tmp_path / f"keys-{keys}.tgz"
        assert run_cli(capsys, "backup", archive, "--config", machine, *(["--include-keys"] if keys else []))[0] == 0
        assert archive.stat().st_mode & 0o777 == 0o600
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            manifest = json.loads(tar.extractfile("manifest.json").read())
        assert ("pki/own/key.pem" in names) is keys and "pki/own/cert.der" in names
        assert manifest["keys_included"] is keys and manifest["machine_id"] == "tempering-01"
        assert manifest["schema_version"] == records_module.SCHEMA_VERSION and manifest["format_version"] == 1
        assert manifest["created"].endswith("Z") and manifest["program"] == "tempering"
        assert {m["path"] for m in manifest["members"]} == set(names) - {"manifest.json"}
    # without the key into a machine that has none: the server will make a new certificate
    code, out, err = run_cli(capsys, "restore", tmp_path / "keys-False.tgz", "--out", tmp_path / "new")
    assert code == 0, err
    assert "clients must trust the new certificate" in out
    assert list((tmp_path / "new" / "var" / "opcua" / "pki" / "own").iterdir()) == []
    # into a machine with a key of its own: it keeps it
    mine = {p.name: p.read_bytes() for p in own.iterdir()}
    code, out, err = run_cli(capsys, "restore", tmp_path / "keys-False.tgz", "--config", machine, "--force")
    assert code == 0, err
    assert "own certificate and key are kept" in out
    assert {p.name: p.read_bytes() for p in own.iterdir()} == mine


def test_restore_out_writes_a_machine_directory_that_keeps_the_comments(tmp_path, capsys, opcua_client_certificates):
    machine = make_machine(tmp_path / "m")
    populate(machine, opcua_client_certificates)
    archive = tmp_path / "m.tgz"
    assert run_cli(capsys, "backup", archive, "--config", machine, "--include-keys")[0] == 0
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "restore", archive, "--out", tmp_path / "empty")
    assert code == 0, err
    new = tmp_path / "empty" / "tempering-machine.yaml"
    text = new.read_text()
    assert "# Machine.csv (record id 1)" in text and "  work_dir: .\n" in text     # comments kept
    cfg, _ = load(new)
    old, _ = load(machine)
    assert cfg.machine.state_file == str(tmp_path / "empty" / "var" / "plc-state.json")
    assert cfg.opcua.data_dir == str(tmp_path / "empty" / "var" / "opcua")
    assert cfg.opcua.endpoint == old.opcua.endpoint and cfg.fieldbus.links == old.fieldbus.links
    assert (tmp_path / "empty" / "recipes.yaml").read_bytes() == (machine.parent / "recipes.yaml").read_bytes()
    assert rows(cfg.opcua.records_url) == rows(old.opcua.records_url)
    code, _, err = run_cli(capsys, "restore", archive, "--out", tmp_path / "empty")
    assert code == 1 and "not an empty directory" in err


def test_a_target_with_a_machine_needs_force(tmp_path, capsys, opcua_client_certificates):
    source, target = make_machine(tmp_path / "a"), make_machine(tmp_path / "b")
    populate(source, opcua_client_certificates)
    populate(target, opcua_client_certificates, users={"bob": ("admin", "bob-secret-12")}, batch=9)
    archive = tmp_path / "a.tgz"
    assert run_cli(capsys, "backup", archive, "--config", source)[0] == 0
    before = tree(target.parent)
    code, _, err = run_cli(capsys, "restore", archive, "--config", target)
    assert code == 1
    assert "has a machine already (1 user in its records" in err and "a state file" in err
    assert "--force replaces it; nothing changed" in err
    assert tree(target.parent) == before
    code, _, err = run_cli(capsys, "restore", archive, "--config", target, "--force")
    assert code == 0, err
    assert rows(records_url(target))["users"] == rows(records_url(source))["users"]


# --------------------------------------------------------------------------- refused archives


def rewrite(archive: Path, out: Path, edit, rehash: bool = True) -> Path:
    """``archive`` written again to ``out`` after ``edit(members, manifest)`` changed the dict of
    members (name -> bytes; a tarfile.TarInfo value is added as it is) and the manifest; with
    ``rehash``, the manifest lists the members as they are now (only the edit is wrong)."""
    with tarfile.open(archive) as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar if i.isreg()}
    manifest = json.loads(members.pop("manifest.json"))
    edit(members, manifest)
    if rehash:
        import hashlib
        manifest["members"] = [{"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                               for n, d in members.items() if isinstance(d, bytes)]
    with tarfile.open(out, "w:gz") as tar:
        for name, data in [("manifest.json", json.dumps(manifest).encode()), *members.items()]:
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def flip_a_byte(m, _):
    data = bytearray(m["records/users.jsonl"])
    data[10] ^= 0x01
    m["records/users.jsonl"] = bytes(data)


def a_link(m, manifest):
    info = tarfile.TarInfo("pki/trusted/evil.der")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    m["pki/trusted/evil.der"] = info


CORRUPTIONS = {
    "flipped byte": (flip_a_byte, False, "member records/users.jsonl: sha256 mismatch"),
    "missing member": (lambda m, _: m.pop("records/audit.jsonl"), False, "member records/audit.jsonl: missing"),
    "extra member": (lambda m, _: m.update({"notes.txt": b"hello"}), False, "member notes.txt: not in the manifest"),
    "unknown format": (lambda _, mf: mf.update(format_version=99), True,
                       "format version 99 is not one this program knows"),
    "path escaping": (lambda m, _: m.update({"../evil.yaml": b"x: 1\n"}), True,
                      "member ../evil.yaml: path escapes the archive (..)"),
    "absolute path": (lambda m, _: m.update({"/tmp/evil.yaml": b"x: 1\n"}), True, "member /tmp/evil.yaml: absolute path"),
    "a link": (a_link, True, "member pki/trusted/evil.der: a link (to /etc/passwd)"),
    "newer schema": (lambda _, mf: mf.update(schema_version="99"), True,
                     f"records schema 99 is newer than this program's ({records_module.SCHEMA_VERSION})"),
    "invalid machine file": (lambda m, _: m.update({"machine/tempering-machine.yaml": m[
        "machine/tempering-machine.yaml"].replace(b"kp: 80.0", b"kp: -1", 1)}), True,
        "the machine inside is not valid:\n  machine/tempering-machine.yaml: zones.pump.kp: must be >= 0 (got -1)"),
    "unknown column": (lambda m, _: m.update({"records/users.jsonl": m["records/users.jsonl"].replace(
        b'"name":', b'"nickname":1,"name":', 1)}), True, "row 1: no column nickname in table users"),
    "not a part": (lambda m, _: m.update({"pki/own/other.pem": b"x"}), True, "member pki/own/other.pem: not a part of a machine backup"),
}


@pytest.fixture(scope="module")
def machines(tmp_path_factory, opcua_client_certificates):
    """A machine and its archive (with keys), and a target machine with other records."""
    base = tmp_path_factory.mktemp("backup")
    source, target = make_machine(base / "a"), make_machine(base / "b")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(records_module, "SCRYPT_COST", FAST_SCRYPT)
        populate(source, opcua_client_certificates)
        populate(target, opcua_client_certificates, users={"bob": ("admin", "bob-secret-12")}, batch=9)
    archive = base / "a.tgz"
    assert main(["backup", str(archive), "--config", str(source), "--include-keys"]) == 0
    return base, archive, target


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_or_tampered_archive_is_refused_with_its_reason(machines, tmp_path, capsys, name):
    base, archive, target = machines
    edit, rehash, reason = CORRUPTIONS[name]
    bad = rewrite(archive, tmp_path / "bad.tgz", edit, rehash)
    before = tree(base)
    code, out, err = run_cli(capsys, "restore", bad, "--config", target, "--force")
    assert code == 1 and out == ""
    assert err.startswith(f"tempering restore: {bad}: ") and reason in err and err.rstrip().endswith("nothing changed")
    assert tree(base) == before                            # not a byte, anywhere
    assert not (tmp_path.parent / "evil.yaml").exists() and not Path("/tmp/evil.yaml").exists()
    code, _, err = run_cli(capsys, "restore", bad, "--out", tmp_path / "new")
    assert code == 1 and reason in err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("data, reason", [(b"not an archive at all", "not a readable tar.gz archive"),
                                          (None, "not a readable tar.gz archive")])
def test_what_is_no_archive_is_refused(machines, tmp_path, capsys, data, reason):
    base, archive, target = machines
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(data if data is not None else archive.read_bytes()[:-200])     # truncated
    before = tree(base)
    code, _, err = run_cli(capsys, "restore", bad, "--config", target, "--force")
    assert code == 1 and reason in err and tree(base) == before


# --------------------------------------------------------------------------- failures late in a restore


@pytest.mark.parametrize("fail_at", [1, 3, 6, 9])
def test_a_restore_that_fails_late_leaves_the_target_as_it_was(machines, tmp_path, capsys, monkeypatch, fail_at):
    """The n-th rename of the change fails (after n - 1 of them were done): every file, the
    records' file among them, is as before, and no temporary file is left."""
    base, archive, target = machines
    before = tree(base)
    moves = []

    def failing(src, dst):
        moves.append((src, dst))
        if len(moves) == fail_at:
            raise OSError(28, "No space left on device")
        os.rename(src, dst)

    monkeypatch.setattr(backup_module, "_move", failing)
    code, _, err = run_cli(capsys, "restore", archive, "--config", target, "--force")
    assert code == 1 and "No space left on device" in err and "the target is as it was" in err
    assert len(moves) == fail_at
    assert tree(base) == before
    assert not [p for p in base.rglob("*") if ".restore-" in p.name]


# --------------------------------------------------------------------------- a running machine


async def address_space(client) -> set[tuple[str, str, str, str]]:
    """The Machine subtree: every forward reference inside the machine's namespace as
    (source, reference type, target, target's browse name)."""
    ns = await client.get_namespace_index(URI)
    root = client.get_node(ua.NodeId("Machine", ns))
    seen, edges, frontier = {root.nodeid}, set(), [root]
    while frontier:
        results = []
        for i in range(0, len(frontier), 200):
            results += await client.browse_nodes(frontier[i:i + 200])
        frontier = []
        for node, result in results:
            for ref in result.References:
                if not ref.IsForward or ref.NodeId.NamespaceIndex != ns:
                    continue
                edges.add((node.nodeid.to_string(), ref.ReferenceTypeId.to_string(),
                           ref.NodeId.to_string(), ref.BrowseName.to_string()))
                target = ua.NodeId(ref.NodeId.Identifier, ref.NodeId.NamespaceIndex)
                if target not in seen:
                    seen.add(target)
                    frontier.append(client.get_node(target))
    return edges


async def browse(opcua_pki) -> set:
    deadline = time.monotonic() + 30
    while True:
        try:
            async with await opcua_pki.client("viewer") as client:
                return await address_space(client)
        except (OSError, asyncio.TimeoutError, ua.UaError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def test_a_running_machine_is_backed_up_refuses_a_restore_and_moves_to_a_new_directory(
        tmp_path, capsys, opcua_pki):
    machine = make_machine(tmp_path / "m", endpoint=opcua_pki.settings.endpoint,
                           data_dir=opcua_pki.settings.data_dir)
    state = machine.parent / "var" / "plc-state.json"
    archive = tmp_path / "m.tgz"
    with TemperingRun(machine, "--plant", "inprocess", "--initial-temp-c", "45") as run:
        run.wait_for(r"opc ua: serving", 90)
        deadline = time.monotonic() + 30
        while not (state.exists() and json.loads(state.read_text()).get("phase") == "heating"):
            assert time.monotonic() < deadline, run.output
            time.sleep(0.1)
        code, out, err = run_cli(capsys, "backup", archive, "--config", machine, "--include-keys")
        assert code == 0, err
        assert "users 4" in out and "(phase heating)" in out
        before = machine.read_bytes()
        code, _, err = run_cli(capsys, "restore", archive, "--config", machine, "--force")
        assert code == 1
        assert "the machine is running (its historian spool" in err and "accepts connections" in err
        assert "a batch of dark-70 is running (tempering-01-" in err and "heating): stop it first" in err
        assert machine.read_bytes() == before
        served = asyncio.run(browse(opcua_pki))
        assert run.stop() == 0, run.output
    moved = tmp_path / "moved"
    code, out, err = run_cli(capsys, "restore", archive, "--out", moved)
    assert code == 0, err
    assert "(phase heating)" in out
    with TemperingRun(moved / "tempering-machine.yaml", "--plant", "inprocess", "--no-start") as run:
        run.wait_for(r"opc ua: serving", 90)
        assert "interrupted" in run.wait_for(r"plc: pid .* phase heating").string
        assert asyncio.run(browse(opcua_pki)) == served     # the same server certificate and users
        assert run.stop() == 0, run.output
    assert len(served) > 1000


# --------------------------------------------------------------------------- PostgreSQL


def test_sqlite_to_postgresql_and_back(tmp_path, capsys, opcua_client_certificates, postgresql_url, monkeypatch):
    machine = make_machine(tmp_path / "m")
    populate(machine, opcua_client_certificates)
    expected = rows(records_url(machine))
    archive = tmp_path / "sqlite.tgz"
    assert run_cli(capsys, "backup", archive, "--config", machine, "--include-keys")[0] == 0
    code, out, err = run_cli(capsys, "restore", archive, "--out", tmp_path / "pg", "--database-url", postgresql_url)
    assert code == 0, err
    pg_machine = tmp_path / "pg" / "tempering-machine.yaml"
    assert load(pg_machine)[0].opcua.database_url == postgresql_url and "# Machine.csv" in pg_machine.read_text()
    assert rows(postgresql_url) == expected
    r = Records(postgresql_url)
    try:
        assert r.check_password("olga", USERS["olga"][1]) == "operator"
        r.audit("olga", "write", "x", 1, 2, "Good", T0 + 5)          # the ids go on after the restored ones
        assert [e["target"] for e in r.audit_entries()] == ["x", "Machine.Zones.Pump.Trim"]
    finally:
        r.close()
    expected = rows(postgresql_url)
    # a restore into PostgreSQL that fails in its transaction (after the renames) changes nothing
    before = tree(tmp_path / "pg")
    real_rows = archive_module.Archive.rows

    def failing_rows(self, table):
        if table == "users":
            raise OSError(5, "Input/output error")
        return real_rows(self, table)

    monkeypatch.setattr(archive_module.Archive, "rows", failing_rows)
    code, _, err = run_cli(capsys, "restore", archive, "--config", pg_machine, "--force",
                           "--database-url", postgresql_url)
    assert code == 1 and "Input/output error" in err
    assert tree(tmp_path / "pg") == before and rows(postgresql_url) == expected
    monkeypatch.setattr(archive_module.Archive, "rows", real_rows)
    # and back: a backup of the PostgreSQL machine (one REPEATABLE READ snapshot) into SQLite
    pg_archive = tmp_path / "pg.tgz"
    assert run_cli(capsys, "backup", pg_archive, "--config", pg_machine)[0] == 0
    code, out, err = run_cli(capsys, "restore", pg_archive, "--out", tmp_path / "back", "--database-url", "sqlite")
    assert code == 0, err
    back = tmp_path / "back" / "tempering-machine.yaml"
    assert load(back)[0].opcua.database_url is None
    assert rows(records_url(back)) == expected
