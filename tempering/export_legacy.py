"""``tempering export-legacy DIR``: a machine as the legacy machine's seven CSV files.

For plants that run old and new machines side by side during the changeover: the machine file
(``machine_config``, ``system``, ``error_settings``, ``zones``), its register map, its recipes
(the records database's, the live book; the recipes file where the database has none yet) and
its users, written in the legacy layout ``tempering.migrate`` reads (UTF-8 with a byte order
mark, ``,`` separated, CRLF, booleans 0/1, pedal times in ms, Parity 0/1/2, bit numbers and zone
outputs ``|``-separated). Besides the legacy columns it writes the columns of this program's
newer fields (``PhaseTolerance``, ``CoolingRampKPerMin``, ..., ``WorkingMax``, a recipe's
``Code``, ``MustChangePassword``), which the old system ignores and ``tempering migrate`` reads:
migrating an export gives back the same machine.

Passwords: the stored hash goes into Password (an ASP.NET Identity hash as the old system wrote
it, which it can verify again; a scrypt hash, which only this program verifies). Recipe Ids
are the legacy Ids the migration kept (``# legacy Recipe.csv Id N`` in the recipes file), the
others numbered after them. Not representable in the legacy files, and said so: a recipe's
acceptance criteria other than the defaults, and the sections with no legacy counterpart
(scan, fieldbus links, historian, opcua, twin).

The files are staged next to DIR and renamed into place together; an existing non-empty DIR
needs ``--force``.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from plc.config import AcceptanceCriteria, ErrorSettings, MachineParams, Recipe, SystemSettings, ZoneConfig
from plc.modbus.legacy import COLUMNS, OPTIONAL_COLUMNS, legacy_rows

from .legacy_csv import column_name
from .migrate import DISPLAY_COLUMNS, FILES, PARITY, PEDAL
from .migrate_files import legacy_ids_of

__all__ = ["export", "tables"]

_PARITY_CODE = {name: code for code, name in PARITY.items()}
_PEDAL_CODE = {name: code for code, name in PEDAL.items()}


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, (list, tuple)):
        return "|".join(map(str, value))
    return "" if value is None else str(value)


def _record(model: type, section: Any) -> tuple[list[str], list[str]]:
    columns = ["Id"] + [column_name(name) for name in model.model_fields]
    cells = ["1"] + [_cell(getattr(section, name)) for name in model.model_fields]
    return columns, cells


def tables(cfg, recipes: dict[str, Recipe], recipes_text: str,
           users: list[tuple[str, str, str, bool]]) -> tuple[dict[str, list[list[str]]], list[str]]:
    """The rows (header first) of each legacy file, and the notes of what was left out."""
    notes: list[str] = []
    out: dict[str, list[list[str]]] = {}
    columns, cells = _record(MachineParams, cfg.machine_config)
    out["Machine.csv"] = [columns + ["Name", "DefaultRecipe"],
                          cells + [cfg.machine.name, cfg.machine.default_recipe]]
    columns, cells = _record(SystemSettings, cfg.system)
    cells[columns.index("Parity")] = _PARITY_CODE[cfg.system.parity]
    out["Screen.csv"] = [columns, cells]
    out["ErrorSettings.csv"] = list(_record(ErrorSettings, cfg.error_settings))
    zone_fields = list(ZoneConfig.model_fields)
    rows = [["Id", "ZoneName"] + [column_name(n) for n in zone_fields] + ["IsActive"]]
    for zone, z in sorted(cfg.zones.items(), key=lambda item: item[1].number):
        rows.append([str(z.number), zone.replace("_", " ").capitalize()]
                    + [_cell(getattr(z, n)) for n in zone_fields] + ["1"])
    out["Configuration.csv"] = rows
    legacy = legacy_ids_of(recipes_text)
    next_id = max((i for i, _ in legacy.values()), default=0) + 1
    recipe_fields = [n for n in Recipe.model_fields if n != "acceptance"]
    rows = [["Id", "Code"] + [column_name(n) for n in recipe_fields] + ["Description", "IsActive"]]
    for code, recipe in recipes.items():
        if code not in legacy:
            legacy[code], next_id = (next_id, ""), next_id + 1
        cells = [str(legacy[code][0]), code]
        for name in recipe_fields:
            value = getattr(recipe, name)
            if name == "pedal":
                cells.append(_PEDAL_CODE[value])
            elif name in ("pedal_on_time", "pedal_off_time"):
                cells.append(_cell(round(value * 1000.0, 3)))
            else:
                cells.append(_cell(value))
        rows.append(cells + [legacy[code][1], "1"])
        if recipe.acceptance != AcceptanceCriteria():
            notes.append(f"Recipe.csv: {code}: acceptance criteria left out (the legacy recipe has "
                         "none; a migration gives the defaults)")
    out["Recipe.csv"] = [rows[0]] + sorted(rows[1:], key=lambda r: int(r[0]))
    header = [*COLUMNS, *OPTIONAL_COLUMNS]
    points = cfg.fieldbus.points if cfg.fieldbus is not None else ()
    out["Mapping.csv"] = [header] + [[row[c] for c in header] for row in legacy_rows(points)]
    rows = [["Id", "Username", "Password", "Role", "MustChangePassword", "IsActive"]]
    for i, (name, role, password_hash, must_change) in enumerate(users, start=1):
        if role == "viewer":
            notes.append(f"Users.csv: {name}: role viewer left out (the legacy roles are operator, "
                         "technician and admin)")
            continue
        stored = password_hash.removeprefix("aspnet$")
        rows.append([str(i), name, stored, role, "1" if must_change else "0", "1"])
    out["Users.csv"] = rows
    notes.append("scan, fieldbus links, historian, opcua, twin: no legacy counterpart, left out "
                 f"({', '.join(DISPLAY_COLUMNS)} of Screen.csv: the old panel's, not known here)")
    return out, notes


def _csv(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return b"\xef\xbb\xbf" + buffer.getvalue().encode("utf-8")


def export(config: str | Path | None, out: str | Path, *, force: bool = False,
           data_dir: str | None = None) -> list[str]:
    """Write the legacy files of the machine ``config`` into ``out``; the notes. Raises
    ConfigError (a bad machine file) or OSError / FileExistsError."""
    from sqlalchemy import select

    from opcua_server import records as records_module
    from opcua_server.config import DEFAULT_CONFIG, load

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out}: exists and is not empty (--force replaces its legacy files)")
    path = Path(config or DEFAULT_CONFIG)
    cfg, book = load(path)
    settings = cfg.opcua.model_copy(update={"data_dir": data_dir}) if data_dir else cfg.opcua
    records = records_module.Records(settings.records_url, machine=cfg.machine.id,
                                     recipe_library=settings.recipe_library)
    try:
        stored = records.load_recipes()
        with records.engine.connect() as db:
            u = records_module.users
            users = [(r.name, r.role, r.password_hash, bool(r.must_change)) for r in
                     db.execute(select(u.c.name, u.c.role, u.c.password_hash, u.c.must_change)
                                .order_by(u.c.name))]
    finally:
        records.close()
    recipes = ({rid: Recipe.model_validate(fields) for rid, fields in stored.items()}
               if stored else dict(book.recipes))
    recipes_text = (path.parent / cfg.machine.recipes_file).read_text(encoding="utf-8")
    rows, notes = tables(cfg, recipes, recipes_text, users)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        for name in FILES:
            (stage / name).write_bytes(_csv(rows[name]))
        os.chmod(stage, 0o700)                      # Users.csv holds password hashes
        if out.is_dir():
            for name in FILES:
                os.replace(stage / name, out / name)
        else:
            os.rename(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return notes


def add_parser(sub, where) -> None:
    x = sub.add_parser("export-legacy", parents=[where],
                       help="write the machine as the legacy machine's seven CSV files")
    x.add_argument("out", metavar="DIR", help="the folder to write the CSV files to")
    x.add_argument("--force", action="store_true", help="replace the legacy files in DIR")
    x.set_defaults(func=cmd_export_legacy)


def cmd_export_legacy(args) -> int:
    from plc.config import ConfigError

    try:
        notes = export(args.config, args.out, force=args.force, data_dir=args.data_dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tempering export-legacy: {exc}; nothing written", file=sys.stderr)
        return 1
    print(f"{args.out}: {', '.join(FILES)}")
    for note in notes:
        print(f"  {note}")
    return 0
