"""``tempering migrate``'s command: a Migration into its machine directory, atomically.

One job: put what ``tempering.migrate.plan`` made into ``--out DIR`` or nothing. The directory
is staged next to DIR and renamed into place; where DIR holds a machine already (``--force``),
its records (audit trail, alarm journal, batch records), PKI and PLC state are copied into the
stage, the legacy set's users and all recipes replaced there in one transaction, and the two
directories exchanged in one step (``renameat2`` RENAME_EXCHANGE; two renames where the system
has no such call). With ``--database-url`` (PostgreSQL) the users and recipes go there, in one
transaction, after the swap (undone if that transaction fails). A directory that is not a
machine is never touched.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

from .legacy_csv import slug
from .machine_dir import Layout, MachineRunning, claim, exchange
from .migrate import (MACHINE_FILE, MAP_FILE, ONE_TIME_FILE, RECIPES_FILE, REPORT_FILE, Migration,
                      MigrationError, plan)

__all__ = ["OutputError", "add_parser", "cmd_migrate", "write"]


class OutputError(Exception):
    """The output directory cannot take the machine (exists without --force, not writable)."""


def is_machine_dir(out: Path) -> bool:
    return (out / MACHINE_FILE).exists()


def write(m: Migration, out: str | Path, *, force: bool = False,
          one_time: typing.Callable[[], str] | None = None) -> list[tuple[str, str]]:
    """Write the machine directory ``out``: staged next to it and renamed into place (with
    ``force``, exchanged with the existing one, whose records (audit trail, alarm journal,
    batches), PKI and PLC state are carried over; its users named in Users.csv and all its
    recipes are replaced). Returns the one-time passwords made, (user, password).
    OutputError when ``out`` exists (without ``force``) or is not a machine directory;
    machine_dir.MachineRunning while the machine there runs (its spool stays locked until the
    exchange is done)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    existing = out.is_dir() and any(out.iterdir())
    if existing and not is_machine_dir(out):
        raise OutputError(f"{out}: not empty and not a machine directory (no {MACHINE_FILE})")
    if existing and not force:
        raise OutputError(f"{out}: holds a machine already ({MACHINE_FILE}); --force replaces its "
                          "configuration, recipes and the users of Users.csv")
    locks = _claim(out) if existing else []
    try:
        return _write(m, out, existing, one_time)
    finally:
        for fd in locks:
            os.close(fd)


def _claim(out: Path) -> list[int]:
    """The existing machine in ``out`` stopped, and its spool locked (MachineRunning if not)."""
    from opcua_server.config import load
    from plc.config import ConfigError

    try:
        cfg, _ = load(out / MACHINE_FILE)
    except ConfigError as exc:
        raise OutputError(f"{out / MACHINE_FILE}: not a valid machine file ({exc.messages[0]})") from None
    return claim(str(out), Layout.of(out / MACHINE_FILE, cfg))


def _write(m: Migration, out: Path, existing: bool,
           one_time: typing.Callable[[], str] | None) -> list[tuple[str, str]]:
    from opcua_server import records as records_module

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.migrate-", dir=out.parent))
    try:
        if existing and (out / "var").is_dir():
            shutil.copytree(out / "var", stage / "var", symlinks=True)
        for fname, text in ((MACHINE_FILE, m.machine_yaml), (MAP_FILE, m.map_yaml),
                            (RECIPES_FILE, m.recipes_yaml), (REPORT_FILE, m.report(out))):
            (stage / fname).write_text(text, encoding="utf-8")
        made = []
        users = []
        for u in m.users:
            password_hash = u.password_hash
            if password_hash is None:
                password = (one_time or records_module.new_one_time_password)()
                password_hash = records_module.hash_password(password)
                made.append((u.name, password))
            users.append(records_module.ImportedUser(u.name, u.role, password_hash, u.must_change))
        opcua = stage / "var" / "opcua"
        opcua.mkdir(parents=True, exist_ok=True)
        os.chmod(opcua, 0o700)
        if made:
            secret = opcua / ONE_TIME_FILE
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("# One-time passwords of the migrated users: hand each to its user, who\n"
                        "# must set a new password at the first login (OPC UA UserManagement\n"
                        "# ChangePassword). Delete this file once they are handed out.\n")
                f.writelines(f"{name} {password}\n" for name, password in made)
        url = m.database_url or f"sqlite:///{opcua / 'tempering.db'}"
        if m.database_url is None:
            _store(url, users, m.recipes, m.machine_id)
        _swap(stage, out, existing)
        if m.database_url is not None:
            try:
                _store(url, users, m.recipes, m.machine_id)
            except Exception:                          # back as it was
                if existing:
                    _swap(stage, out, True)
                else:
                    os.rename(out, stage)
                raise
        return made
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap(stage: Path, out: Path, existing: bool) -> None:
    if not existing:
        if out.exists():
            out.rmdir()                                   # an empty directory
        os.rename(stage, out)
    elif not exchange(stage, out):
        old = out.with_name(f".{out.name}.old")
        os.rename(out, old)
        os.rename(stage, out)
        os.rename(old, stage)


def _store(url: str, users: list, recipes: dict[str, dict[str, Any]], machine: str) -> None:
    """Users and recipes into the records at ``url`` in one transaction: the users of the
    legacy set replace those of the same name, the recipes replace all recipes of ``machine``
    (its own book and the unclaimed one, where they go: the machine takes them when it opens
    its records; the other books of a shared database are left alone)."""
    from sqlalchemy import delete, insert

    from opcua_server import records as records_module

    records = records_module.Records(url)
    try:
        rows = [records_module.validate_recipe(rid, fields) for rid, fields in recipes.items()]
        with records.engine.begin() as db:
            names = [u.name for u in users]
            db.execute(delete(records_module.users).where(records_module.users.c.name.in_(names)))
            db.execute(delete(records_module.recipes).where(
                records_module.recipes.c.book.in_(("", records_module.book_of(machine)))))
            if users:
                db.execute(insert(records_module.users), [
                    {"name": u.name, "role": u.role, "password_hash": u.password_hash,
                     "must_change": u.must_change} for u in users])
            db.execute(insert(records_module.recipes), [
                {"id": rid, **records_module._recipe_row(values)}
                for rid, values in zip(recipes, rows)])
            seeded = records_module.meta.c.key == "recipes_seeded"
            db.execute(delete(records_module.meta).where(seeded))
            db.execute(insert(records_module.meta).values(key="recipes_seeded", value="migrated"))
    finally:
        records.close()


def add_parser(sub, where) -> None:
    x = sub.add_parser("migrate", help="turn a legacy machine's CSV files into a machine directory")
    x.add_argument("legacy", metavar="LEGACY_DIR", help="the folder with the seven legacy CSV files")
    x.add_argument("--out", required=True, metavar="DIR", help="the machine directory to write")
    x.add_argument("--machine-id", metavar="ID", help="the machine's id (default: the name of DIR)")
    x.add_argument("--fieldbus", default="rtu", metavar="rtu|tcp:HOST:PORT",
                   help="the Modbus link: rtu (Screen.csv's serial line, the default) or a TCP "
                        "gateway (tcp:HOST:PORT)")
    x.add_argument("--database-url", metavar="URL",
                   help="the records database (default: SQLite in DIR/var/opcua); "
                        "postgresql+psycopg://user@host/db")
    x.add_argument("--dry-run", action="store_true",
                   help="print what would be written and the report; write nothing")
    x.add_argument("--force", action="store_true", help="replace the machine in DIR")
    x.set_defaults(func=cmd_migrate)


def cmd_migrate(args) -> int:
    out = Path(args.out)
    machine_id = args.machine_id or slug(out.resolve().name)
    try:
        m = plan(args.legacy, machine_id=machine_id, fieldbus=args.fieldbus,
                 database_url=args.database_url)
    except MigrationError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"tempering migrate: {len(exc.problems)} problem(s); nothing written", file=sys.stderr)
        return 1
    if args.dry_run:
        for name, text in ((MACHINE_FILE, m.machine_yaml), (MAP_FILE, m.map_yaml),
                           (RECIPES_FILE, m.recipes_yaml)):
            print(f"===== {out / name}\n{text}")
        print(f"===== {out / REPORT_FILE}\n{m.report(out)}")
        print("(dry run: nothing written)")
        return 0
    try:
        made = write(m, out, force=args.force)
    except (OutputError, MachineRunning, OSError) as exc:
        print(f"tempering migrate: {exc}; nothing written", file=sys.stderr)
        return 1
    print(m.report(out), end="")
    print(f"\n{out / MACHINE_FILE}: the migrated machine; run it on the twin with\n"
          f"  tempering run --config {out / MACHINE_FILE}")
    if made:
        print(f"one-time passwords of {', '.join(n for n, _ in made)}: {out}/var/opcua/{ONE_TIME_FILE}")
    return 0
