"""``tempering migrate``: a legacy machine's seven CSV files to a validated machine directory.

The legacy machine kept its whole configuration in seven CSV files (read by
``tempering.legacy_csv``: UTF-8 with or without BOM or Windows-1252, CRLF, ``,`` or ``;``,
decimal commas, quoted fields; column names matched without regard to case and ``_``):

====================  ============================================  ===========================
file                  holds                                         becomes
====================  ============================================  ===========================
Machine.csv           one record, Id 1: temperature limits, delays  ``machine_config`` (and
                      (s), set-point offsets; optional Name,        ``machine.name``,
                      DefaultRecipe                                 ``machine.default_recipe``)
Configuration.csv     one record per zone (ZoneNumber 1..4): limits, ``zones.<name>``
                      PID gains, currents, outputs (names, ``|``)
Screen.csv            one record, Id 1: serial line (Parity 0 none,  ``system``, and the serial
                      1 odd, 2 even), SendingInterval (ms), limits;  link of ``fieldbus``
                      the panel's Brightness, DimTimeout,
                      ScreenOffTimeout (not carried over)
ErrorSettings.csv     one record, Id 1: grid and sensor limits      ``error_settings``
Recipe.csv            one record per recipe: goals (degC), flags    ``recipes.yaml`` and the
                      0/1, PedalMode (0 manual, 1 auto, or the      records database's recipes
                      name), PedalOnTime/PedalOffTime (ms)
Mapping.csv           the Modbus register map (``plc.modbus.legacy``) ``register-map.yaml``
Users.csv             Username, Password, Role, FullName, Email     the records database's users
====================  ============================================  ===========================

Every file has ``Id`` and may have ``IsActive`` (0/1; 0: the row is skipped, and said so). A
field whose column is absent or whose cell is empty gets the default machine's value
(``config/tempering-machine.yaml``; for a recipe: flags 0, pedal manual, pedal times 3 s / 2 s,
working_max the pouring goal + 3 K but at most the heating goal), each one in the report.
Columns of this program's newer fields (``PhaseTolerance``, ``CoolingRampKPerMin``, ...,
``WorkingMax``, recipe ``Code``) are read when present: ``tempering export-legacy`` writes them,
so migrating an export gives back the same machine.

The result is checked by the very loaders of a hand-written machine (``opcua_server.config.load``
on the staged files: every field, every cross-section rule, every recipe against the machine,
the register map against the I/O contract); each message is mapped back to the CSV file, line
and column it came from. Every problem of every file is reported at once, as
``<file>:<line>: <column>: <message> (got <value>)``, and then nothing is written.

Pure part: ``plan(legacy_dir, ...) -> Migration`` (reads the files, converts, validates in a
temporary directory, hashes the plain passwords; raises MigrationError). ``write(migration,
out, force)`` stages the machine directory next to ``out`` and swaps it in with one rename
(an atomic exchange of the two directories where one exists already), or writes nothing.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import math
import os
import re
import shutil
import tempfile
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from opcua_server.config import DEFAULT_CONFIG, load
from plc.config import ConfigError, ErrorSettings, MachineParams, Recipe, SystemSettings, ZoneConfig
from plc.configbase import _read_mapping, _show
from plc.contract import ZONE_NUMBERS
from plc.modbus.legacy import _Dumper, dump_register_map, parse_mapping

from .legacy_csv import LegacyTable, Row, key_of, message, read_table

__all__ = ["FILES", "Migration", "MigrationError", "UserPlan", "plan", "write", "slug"]

FILES = ("Machine.csv", "Configuration.csv", "Screen.csv", "ErrorSettings.csv", "Recipe.csv",
         "Mapping.csv", "Users.csv")
MACHINE_FILE, MAP_FILE, RECIPES_FILE, REPORT_FILE = (
    "tempering-machine.yaml", "register-map.yaml", "recipes.yaml", "migration-report.txt")
ONE_TIME_FILE = "one-time-passwords"            # in <out>/var/opcua, mode 0600
ROLES = ("operator", "technician", "admin")
#: Recipe defaults of fields the legacy Recipe.csv may lack.
RECIPE_DEFAULTS = {"mixer_enabled": False, "fountain_enabled": False, "mold_heater_enabled": False,
                   "vibration_enabled": False, "vib_heater_enabled": False, "pedal": "manual",
                   "pedal_on_time": 3.0, "pedal_off_time": 2.0}
WORKING_MAX_MARGIN_K = 3.0
PARITY = {"0": "none", "1": "odd", "2": "even"}
PEDAL = {"0": "manual", "1": "auto"}
#: Screen.csv columns of the old panel's display: read, not carried over.
DISPLAY_COLUMNS = ("Brightness", "DimTimeout", "ScreenOffTimeout")
_LEGACY_ID = re.compile(r"^\s*# legacy Recipe\.csv Id (\d+)(?:: (.*))?$")


class MigrationError(Exception):
    """Every problem of the legacy set, one message each (``<file>:<line>: <column>: ...``)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class UserPlan:
    line: int
    name: str
    role: str
    scheme: str                      # the legacy password's scheme ("plain", "bcrypt", ...)
    password_hash: str | None        # what is stored; None: a one-time password is made
    must_change: bool
    note: str


@dataclass
class Migration:
    """What ``write`` puts in a machine directory, and the report of how it came about."""

    legacy_dir: str
    machine_id: str
    machine_yaml: str
    map_yaml: str
    recipes_yaml: str
    recipes: dict[str, dict[str, Any]]
    users: list[UserPlan]
    database_url: str | None
    counts: list[tuple[str, int, int, str]] = field(default_factory=list)  # file, used, skipped, format
    defaults: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def report(self, out: str | Path) -> str:
        lines = [f"Migration of the legacy machine {self.legacy_dir} to {out}",
                 f"machine id {self.machine_id}", "", "Files read:"]
        for file, used, skipped, fmt in self.counts:
            lines.append(f"  {file:<18} {used:>3} record(s) used, {skipped} skipped  ({fmt})")
        for title, items in (("Defaults filled in for missing fields", self.defaults),
                             ("Values converted", self.converted),
                             ("Rows skipped", self.skipped),
                             ("Not carried over", self.dropped)):
            lines += ["", f"{title} ({len(items)}):"] + [f"  {item}" for item in items]
        lines += ["", f"Users ({len(self.users)}):"]
        for u in self.users:
            lines.append(f"  Users.csv:{u.line}: {u.name} ({u.role}): {u.note}")
        must = [u.name for u in self.users if u.password_hash is None]
        if must:
            lines.append(f"  one-time passwords for {', '.join(must)}: var/opcua/{ONE_TIME_FILE} "
                         "(mode 0600); each must set a new password at first login")
        lines += ["", "Written:",
                  f"  {MACHINE_FILE}  (machine.work_dir '.': its data under var/)",
                  f"  {MAP_FILE}", f"  {RECIPES_FILE}  ({len(self.recipes)} recipe(s))",
                  "  users and recipes in " + (self.database_url or "var/opcua/tempering.db"),
                  f"  {REPORT_FILE}"]
        return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    """A recipe or machine id from a name: ``Dark 70 %`` -> ``dark-70``, ``Crème`` -> ``creme``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


# --------------------------------------------------------------------------- columns and values

def _kind(annotation: Any) -> str:
    """How a model field's cell is read: number, integer, text, choice, outputs."""
    if annotation is float:
        return "number"
    if annotation is int:
        return "integer"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "integer" if isinstance(typing.get_args(annotation)[0], int) else "text"
    if origin is tuple:
        return "outputs"
    return "text"


def _fields(model: type, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """Column key -> (field, kind) of a model's fields."""
    return {key_of(_camel(name)): (name, _kind(f.annotation)) for name, f in model.model_fields.items()
            if name not in skip}


#: Legacy column names that are not the field's name in CamelCase.
_LEGACY_NAMES = {"number": "ZoneNumber", "pedal": "PedalMode"}


def _camel(name: str) -> str:
    """The legacy column name of a field: ``tank_max_heat`` -> ``TankMaxHeat``."""
    if name in _LEGACY_NAMES:
        return _LEGACY_NAMES[name]
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _known(fields: dict[str, tuple[str, str]], *extra: str) -> dict[str, str]:
    known = {key_of(c): c for c in ("Id", "IsActive", *extra)}
    known.update({key: _camel(name) for key, (name, _) in fields.items()})
    return known


class _Reader:
    """The conversions and defaults of one migration, collected for the report."""

    def __init__(self, migration: Migration):
        self.m = migration

    def value(self, row: Row, key: str, name: str, kind: str, default: Any, where: str,
              default_source: str = "the default machine's") -> Any:
        """One cell as a field's value; the default (reported) when absent or empty."""
        column = row.column(key)
        if kind == "outputs" and key in row.names and not row.has(key):
            return ()                                  # an empty list of outputs: none
        if not row.has(key):
            shown = _camel(name) if key not in row.names else column
            state = "empty" if key in row.names else "absent"
            self.m.defaults.append(f"{row.file}:{row.line}: {shown}: {state} -> {where} "
                                   f"{_show_value(default)} ({default_source})")
            return default
        text = row.text(key)
        if kind == "number":
            value = row.number(key)
            if value is not None and "," in text:
                self.m.converted.append(f"{row.file}:{row.line}: {column}: decimal comma "
                                        f"{text!r} -> {_show_value(value)}")
            if value is not None and isinstance(default, int) and value.is_integer():
                value = int(value)
            return value
        if kind == "integer":
            return row.integer(key)
        if kind == "flag":
            return row.flag(key)
        if kind == "outputs":
            names = tuple(part.strip() for part in text.split("|") if part.strip())
            if "|" in text:
                self.m.converted.append(f"{row.file}:{row.line}: {column}: {text!r} -> "
                                        f"{list(names)}")
            return names
        return text


def _show_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return _show(value) if not isinstance(value, str) else value


def _flags_converted(m: Migration, table: LegacyTable, keys: list[str], rows: list[Row]) -> None:
    present = [k for k in keys if k in table.columns]
    if present and rows:
        names = ", ".join(rows[0].column(k) for k in present)
        m.converted.append(f"{table.file}: {names}: 0/1 -> false/true on {len(rows)} row(s)")


def _active(m: Migration, table: LegacyTable, label) -> list[Row]:
    """The active rows (IsActive absent, empty or 1); the others reported as skipped."""
    out = []
    for row in table.rows:
        if row.problems:
            continue
        if row.has("isactive") and row.flag("isactive") is not True:
            if not row.problems:
                m.skipped.append(f"{table.file}:{row.line}: {label(row)}: inactive (IsActive 0)")
            continue
        out.append(row)
    return out


def _single(m: Migration, table: LegacyTable, problems: list[str]) -> Row | None:
    """The one record of a single-record file: Id 1, and no second active record."""
    rows = _active(m, table, lambda row: f"record Id {row.text('id')}")
    if not rows:
        if not table.problems and not any(r.problems for r in table.rows):
            problems.append(message(table.file, None, "file", "no active record (it holds one, Id 1)"))
        return None
    first = rows[0]
    if first.text("id") != "1":
        first.problem("id", f"must be 1 ({table.file} holds one record)", first.text("id"))
    for extra in rows[1:]:
        extra.problem("id", f"a second record ({table.file} holds one record, Id 1; the first "
                            f"is on line {first.line})", extra.text("id"))
    return first


# --------------------------------------------------------------------------- the plan


def plan(legacy_dir: str | Path, *, machine_id: str, fieldbus: str = "rtu",
         database_url: str | None = None) -> Migration:
    """Read, convert and validate the legacy set in ``legacy_dir``. ``fieldbus``: ``rtu`` (the
    serial line of Screen.csv) or ``tcp:HOST:PORT`` (a Modbus TCP gateway or the twin).
    Raises MigrationError with every problem."""
    from opcua_server import records as records_module

    legacy = Path(legacy_dir)
    problems: list[str] = []
    if not re.match(r"^[a-z0-9-]+$", machine_id or ""):
        problems.append(f"--machine-id: lower-case letters, digits and '-' only (got {machine_id!r})")
    if not legacy.is_dir():
        raise MigrationError([f"{legacy}: not a directory"])
    default = _read_mapping(DEFAULT_CONFIG)
    m = Migration(str(legacy_dir), machine_id, "", "", "", {}, [], database_url)

    def data_of(name: str) -> bytes | None:
        path = legacy / name
        try:
            return path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{name}: missing from {legacy}")
        except OSError as exc:
            problems.append(f"{name}: cannot read: {exc.strerror or exc}")
        return None

    raw = {name: data_of(name) for name in FILES}
    reader = _Reader(m)
    machine = copy.deepcopy(default)
    tables: dict[str, LegacyTable] = {}
    origin: dict[str, tuple[str, int, str]] = {}      # yaml path -> (file, line, column)

    def table(name: str, fields: dict, *extra: str, required: tuple[str, ...] = ("id",)) -> LegacyTable | None:
        if raw[name] is None:
            return None
        t = read_table(name, raw[name], _known(fields, *extra), required)
        tables[name] = t
        problems.extend(t.problems)
        return t

    # ---- single-record files: Machine.csv, Screen.csv, ErrorSettings.csv
    singles = (("Machine.csv", "machine_config", MachineParams, ("Name", "DefaultRecipe")),
               ("Screen.csv", "system", SystemSettings, DISPLAY_COLUMNS),
               ("ErrorSettings.csv", "error_settings", ErrorSettings, ()))
    records: dict[str, Row] = {}
    for name, section, model, extra in singles:
        fields = _fields(model)
        t = table(name, fields, *extra)
        if t is None or t.problems:
            continue
        row = _single(m, t, problems)
        if row is None:
            continue
        records[name] = row
        values = {}
        for key, (fname, kind) in fields.items():
            where = f"{section}.{fname}"
            origin[where] = (name, row.line, row.column(key) if key in row.names else _camel(fname))
            if section == "system" and fname == "parity" and row.has(key):
                text = row.text(key)
                if text in PARITY:
                    m.converted.append(f"{name}:{row.line}: {row.column(key)}: {text} -> {PARITY[text]}")
                    text = PARITY[text]
                values[fname] = text.lower()
                continue
            values[fname] = reader.value(row, key, fname, kind, default[section].get(fname), where)
        if row.problems:                 # the default machine's section stands in, unreported
            _forget(origin, section)
            continue
        machine[section] = values
        for column in extra:
            if column in DISPLAY_COLUMNS and key_of(column) in row.names:
                m.dropped.append(f"{name}: {row.column(key_of(column))}: the old panel's display "
                                 f"setting ({row.text(key_of(column)) or 'empty'}); no counterpart here")
    for name in ("Machine.csv", "Screen.csv", "ErrorSettings.csv"):
        for row in tables[name].rows if name in tables else ():
            problems.extend(row.problems)
    machine_row = records.get("Machine.csv")

    # ---- Configuration.csv: one record per zone
    zone_fields = _fields(ZoneConfig)
    t = table("Configuration.csv", zone_fields, "ZoneName", required=("id", "zonenumber"))
    if t is not None and not t.problems:
        rows = _active(m, t, lambda row: f"zone {row.text('zonenumber')}")
        zones: dict[str, Any] = {}
        seen: dict[int, int] = {}
        for row in rows:
            number = row.integer("zonenumber")
            if number is None:
                continue
            zone = next((z for z, n in ZONE_NUMBERS.items() if n == number), None)
            if zone is None:
                row.problem("zonenumber", "must be a zone number 1..4 (1 tank bottom, 2 tank wall, "
                                          "3 pump, 4 fountain)", row.text("zonenumber"))
                continue
            if number in seen:
                row.problem("zonenumber", f"zone {number} again (first on line {seen[number]})", number)
                continue
            seen[number] = row.line
            values = {}
            for key, (fname, kind) in zone_fields.items():
                where = f"zones.{zone}.{fname}"
                origin[where] = (t.file, row.line, row.column(key) if key in row.names else _camel(fname))
                if fname == "number":
                    values[fname] = number
                    continue
                values[fname] = reader.value(row, key, fname, kind, default["zones"][zone][fname], where)
            if row.problems:
                _forget(origin, f"zones.{zone}")
                continue
            zones[zone] = values
            origin[f"zones.{zone}"] = (t.file, row.line, "row")
        for row in t.rows:
            problems.extend(row.problems)
        if not any(row.problems for row in t.rows):
            for zone, number in ZONE_NUMBERS.items():
                if zone not in zones:
                    problems.append(message(t.file, None, "ZoneNumber", f"no active record for "
                                            f"zone {number} ({zone.replace('_', ' ')})"))
        machine["zones"] = {**default["zones"], **zones}

    # ---- Recipe.csv
    recipe_fields = _fields(Recipe, skip=("acceptance",))
    t = table("Recipe.csv", recipe_fields, "Code", "Description",
              required=("id", "name", "heatinggoal", "coolinggoal", "pouringgoal"))
    recipes: dict[str, dict[str, Any]] = {}
    recipe_rows: dict[str, Row] = {}
    legacy_ids: dict[str, int] = {}
    if t is not None and not t.problems:
        rows = _active(m, t, lambda row: f"recipe {row.text('name')!r}")
        ids: dict[str, int] = {}
        for row in rows:
            legacy_id = row.integer("id")
            if legacy_id is not None and str(legacy_id) in ids:
                row.problem("id", f"already used on line {ids[str(legacy_id)]}", legacy_id)
            ids.setdefault(str(legacy_id), row.line)
            code = row.text("code") or slug(row.text("name")) or f"r{row.text('id')}"
            if not re.match(r"^[a-z0-9-]+$", code):
                row.problem("code", "lower-case letters, digits and '-' only", code)
            if code in recipe_rows:
                row.problem("name", f"gives the recipe id {code!r} of line {recipe_rows[code].line} "
                                    "(names must differ, or give a Code column)", row.text("name"))
                continue
            if not row.has("code"):
                m.converted.append(f"{t.file}:{row.line}: Name: {row.text('name')!r} -> recipe id {code}")
            values: dict[str, Any] = {}
            for key, (fname, kind) in recipe_fields.items():
                where = f"recipes.{code}.{fname}"
                origin[where] = (t.file, row.line, row.column(key) if key in row.names else _camel(fname))
                if fname.endswith("_enabled"):
                    values[fname] = (row.flag(key) if row.has(key) else
                                     reader.value(row, key, fname, "flag", False, where, "the legacy default"))
                elif fname in ("pedal_on_time", "pedal_off_time") and row.has(key):
                    ms = row.number(key)
                    if ms is not None:
                        values[fname] = ms / 1000.0
                        m.converted.append(f"{t.file}:{row.line}: {row.column(key)}: {row.text(key)} ms "
                                           f"-> {fname} {_show(ms / 1000.0)} s")
                elif fname == "pedal":
                    pkey = "pedalmode"
                    if row.has(pkey):
                        text = row.text(pkey).lower()
                        if text in PEDAL:
                            m.converted.append(f"{t.file}:{row.line}: {row.column(pkey)}: {text} -> {PEDAL[text]}")
                            text = PEDAL[text]
                        values[fname] = text
                    else:
                        values[fname] = reader.value(row, pkey, "pedal_mode", "text", "manual", where,
                                                     "the legacy default")
                elif fname == "working_max" and not row.has(key):
                    values[fname] = None                       # filled in below, from the goals
                elif fname in RECIPE_DEFAULTS:
                    values[fname] = reader.value(row, key, fname, kind, RECIPE_DEFAULTS[fname], where,
                                                 "the legacy default")
                else:
                    values[fname] = reader.value(row, key, fname, kind, None, where)
            if values.get("working_max", 0) is None:
                heating, pouring = values.get("heating_goal"), values.get("pouring_goal")
                if isinstance(heating, (int, float)) and isinstance(pouring, (int, float)):
                    wm = round(min(pouring + WORKING_MAX_MARGIN_K, heating), 3)
                    values["working_max"] = wm
                    m.defaults.append(f"{t.file}:{row.line}: WorkingMax: absent -> recipes.{code}."
                                      f"working_max {_show(wm)} (the pouring goal + "
                                      f"{_show(WORKING_MAX_MARGIN_K)} K, at most the heating goal)")
            recipe_rows[code] = row
            if row.problems:
                _forget(origin, f"recipes.{code}")
                continue
            recipes[code] = values
            if legacy_id is not None:
                legacy_ids[code] = legacy_id
            origin[f"recipes.{code}"] = (t.file, row.line, "row")
        _flags_converted(m, t, [k for k in recipe_fields if k.endswith("enabled")], rows)
        for row in t.rows:
            problems.extend(row.problems)
        if not recipes and not any(row.problems for row in t.rows):
            problems.append(message(t.file, None, "file", "no active recipe"))

    # ---- machine section, fieldbus
    section = dict(default["machine"])
    section.update(id=machine_id, state_file="var/plc-state.json", recipes_file=RECIPES_FILE,
                   work_dir=".")
    origin["machine.name"] = origin["machine.default_recipe"] = ("Machine.csv",
                                                                 machine_row.line if machine_row else 0, "")
    if machine_row is not None and machine_row.has("name"):
        section["name"] = machine_row.text("name")
        origin["machine.name"] = ("Machine.csv", machine_row.line, machine_row.column("name"))
    else:
        section["name"] = f"Tempering machine {machine_id} (migrated)"
        m.defaults.append(f"Machine.csv: Name: absent -> machine.name {section['name']!r}")
    first_recipe = min(recipes, key=lambda c: (legacy_ids.get(c, 0), c)) if recipes else "none"
    if machine_row is not None and machine_row.has("defaultrecipe"):
        section["default_recipe"] = machine_row.text("defaultrecipe")
        origin["machine.default_recipe"] = ("Machine.csv", machine_row.line, machine_row.column("defaultrecipe"))
    else:
        section["default_recipe"] = first_recipe
        m.defaults.append(f"Machine.csv: DefaultRecipe: absent -> machine.default_recipe "
                          f"{first_recipe} (the active recipe with the lowest Id)")
    machine["machine"] = section
    machine["scan"] = {k: v for k, v in default["scan"].items() if k != "period_ms"}
    m.defaults.append("scan: period_ms left out: the scan period is Screen.csv's SendingInterval "
                      f"({_show(machine['system'].get('sending_interval'))} ms); the watchdog and "
                      "PWM settings are the default machine's")
    machine["fieldbus"] = _fieldbus(default, machine.get("system", {}), fieldbus, m, problems)
    if database_url:
        machine["opcua"] = {**default["opcua"], "database_url": database_url}
    for name in ("historian", "opcua"):
        m.defaults.append(f"{name}: the default machine's section (no legacy counterpart)")
    machine.pop("twin", None)
    m.defaults.append("twin: left out (the simulated machine is the default twin)")

    # ---- Mapping.csv
    points = ()
    if raw["Mapping.csv"] is not None:
        from .legacy_csv import decode

        try:
            text, encoding = decode("Mapping.csv", raw["Mapping.csv"])
            if not text.strip():
                raise ValueError(message("Mapping.csv", None, "file", "is empty"))
            points = parse_mapping(text, "Mapping.csv")
            mapping = read_table("Mapping.csv", raw["Mapping.csv"],
                                 {key_of(c): c for c in _MAPPING_COLUMNS}, ())
            tables["Mapping.csv"] = mapping
            for row in mapping.rows:
                if row.text("isactive") == "0":
                    m.skipped.append(f"Mapping.csv:{row.line}: {row.text('name')}: inactive (IsActive 0)")
                elif "|" in row.text("bitnumbers"):
                    m.converted.append(f"Mapping.csv:{row.line}: BitNumbers: {row.text('bitnumbers')!r} "
                                       f"-> bits [{', '.join(row.text('bitnumbers').split('|'))}]")
            _flags_converted(m, mapping, ["isreadoperation", "isactive"], mapping.rows)
        except ConfigError as exc:
            problems.extend(exc.messages)
        except ValueError as exc:
            problems.append(str(exc))
    m.map_yaml = dump_register_map(points, "Mapping.csv") if points else ""

    # ---- Users.csv
    t = table("Users.csv", {}, "Username", "Password", "Role", "FullName", "Email",
              "MustChangePassword", required=("id", "username", "password", "role"))
    if t is not None and not t.problems:
        rows = _active(m, t, lambda row: f"user {row.text('username')!r}")
        names: dict[str, int] = {}
        for row in rows:
            name = row.text("username")
            role = row.text("role").lower()
            if not re.match(records_module.USER_NAME.pattern, name):
                row.problem("username", "letters, digits and . _ @ - only, 1..64 characters", name)
            elif name in names:
                row.problem("username", f"already used on line {names[name]}", name)
            names.setdefault(name, row.line)
            if role not in ROLES:
                row.problem("role", f"must be one of {', '.join(ROLES)}", row.text("role"))
            must_change = row.has("mustchangepassword") and row.flag("mustchangepassword")
            if row.problems:
                continue
            password = row.cells.get("password", "")
            if password.startswith("scrypt$") and records_module.hash_cost(password) is not None:
                plan_ = UserPlan(row.line, name, role, "scrypt", password, bool(must_change),
                                 "scrypt hash of this program, kept" +
                                 (" (must set a new password)" if must_change else ""))
            else:
                legacy_pw = records_module.legacy_password(password)
                must = legacy_pw.password_hash is None or legacy_pw.must_change or bool(must_change)
                plan_ = UserPlan(row.line, name, role, legacy_pw.scheme, legacy_pw.password_hash,
                                 must, legacy_pw.note)
            if row.text("role") != role:
                m.converted.append(f"Users.csv:{row.line}: Role: {row.text('role')!r} -> {role}")
            m.users.append(plan_)
            for column in ("fullname", "email"):
                if row.has(column):
                    m.dropped.append(f"Users.csv:{row.line}: {row.column(column)}: not kept (a user "
                                     "here is a name, a role and a password)")
        for row in t.rows:
            problems.extend(row.problems)
        if m.users and not any(u.role == "admin" for u in m.users):
            m.defaults.append("Users.csv: no admin: the server makes one (admin) at first start, "
                              "its password in var/opcua/initial-admin-password")

    for name, t in tables.items():
        used = len(_active_silently(t))
        m.counts.append((name, used, len(t.rows) - used,
                         f"{t.encoding}, '{t.delimiter}' separated"))

    # ---- the staged files, through the loaders of a hand-written machine. Where a file or a
    # row could not be read, the default machine's part stands in so the rest is checked too;
    # messages about what stood in are left out.
    m.machine_yaml = _machine_text(machine, m.legacy_dir)
    m.recipes_yaml = _recipes_text(recipes, legacy_ids, recipe_rows, m.legacy_dir)
    book = None
    if recipes:
        with tempfile.TemporaryDirectory(prefix="tempering-migrate-") as stage:
            files = {MACHINE_FILE: m.machine_yaml, RECIPES_FILE: m.recipes_yaml,
                     MAP_FILE: m.map_yaml or (DEFAULT_CONFIG.parent / MAP_FILE).read_text()}
            for fname, text in files.items():
                Path(stage, fname).write_text(text, encoding="utf-8")
            try:
                _, book = load(Path(stage) / MACHINE_FILE)
            except ConfigError as exc:
                for msg in exc.messages:
                    mapped = _back(msg, stage, origin)
                    if mapped is not None or not problems:
                        problems.append(mapped or msg.replace(stage + os.sep, ""))
    if problems:
        raise MigrationError(sorted(problems, key=_file_order))
    m.recipes = {rid: r.model_dump() for rid, r in book.recipes.items()}
    return m


def _forget(origin: dict, prefix: str) -> None:
    for key in [k for k in origin if k == prefix or k.startswith(prefix + ".")]:
        del origin[key]


def _file_order(problem: str) -> tuple[int, float]:
    """Problems by legacy file (in FILES order), then line."""
    match = re.match(r"^([A-Za-z]+\.csv)(?::(\d+))?", problem)
    if not match:
        return (len(FILES), 0)
    index = FILES.index(match.group(1)) if match.group(1) in FILES else len(FILES)
    return (index, int(match.group(2)) if match.group(2) else math.inf)


def _active_silently(t: LegacyTable) -> list[Row]:
    return [r for r in t.rows if r.text("isactive") in ("", "1")]


_MAPPING_COLUMNS = ("Id", "Name", "ModbusAddress", "IsReadOperation", "BitNumbers", "FunctionCode",
                    "DataType", "Description", "IsActive", "Link", "UnitId", "WordOrder", "Scale",
                    "Offset", "Unit")


def _fieldbus(default: dict, system: dict, fieldbus: str, m: Migration, problems: list[str]) -> dict:
    """The ``fieldbus`` section: one link ``io``, RTU on Screen.csv's serial line, or TCP."""
    base = dict(default["fieldbus"]["links"]["io"])
    for key in ("transport", "host", "port"):
        base.pop(key, None)
    if fieldbus == "rtu":
        port = str(system.get("serial_port", ""))
        device = port
        match = re.match(r"^COM(\d+)$", port, re.IGNORECASE)
        if match:
            device = f"/dev/ttyS{int(match.group(1)) - 1}"
            m.converted.append(f"Screen.csv: SerialPort: {port} -> {device} (a USB adapter is "
                               "/dev/ttyUSB0: edit fieldbus.links.io.device)")
        link = {"transport": "rtu", "device": device, "baud_rate": system.get("baud_rate"),
                "parity": system.get("parity"), "stop_bits": system.get("stop_bits"), **base}
    else:
        match = re.match(r"^tcp:([^:]+):(\d+)$", fieldbus)
        if not match:
            problems.append(f"--fieldbus: rtu or tcp:HOST:PORT (got {fieldbus!r})")
            return {}
        link = {"transport": "tcp", "host": match.group(1), "port": int(match.group(2)), **base}
    return {"links": {"io": link}, "map_file": MAP_FILE,
            "stale_after_ms": default["fieldbus"]["stale_after_ms"]}


class _BlockDumper(_Dumper):
    """Sections in block style, lists (zone outputs, bits) in flow style, strings as
    ``plc.modbus.legacy`` quotes them (read back as the same strings)."""


_BlockDumper.add_representer(tuple, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", list(v), flow_style=True))
_BlockDumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=True))


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100)


def _machine_text(machine: dict, source: str) -> str:
    head = [f"# Machine file migrated from the legacy machine's CSV files ({Path(source).name}/)",
            "# by `tempering migrate`; see migration-report.txt. Fields and their meaning: the",
            "# default machine, config/tempering-machine.yaml. Check with `tempering check-config`.",
            ""]
    return "\n".join(head) + "".join(_dump({k: v}) + "\n" for k, v in machine.items())


def _recipes_text(recipes: dict, legacy_ids: dict[str, int], rows: dict[str, Row], source: str) -> str:
    lines = [f"# Recipes migrated from the legacy Recipe.csv ({Path(source).name}/) by `tempering migrate`.",
             "# Fields and rules: config/recipes.yaml. Temperatures in degC, pedal times in s.", "",
             "recipes:"]
    for code, values in recipes.items():
        lines.append(f"  {code}:")
        if code in legacy_ids:
            description = rows[code].text("description")
            lines.append(f"    # legacy Recipe.csv Id {legacy_ids[code]}" +
                         (f": {description}" if description else ""))
        lines += ["    " + line for line in _dump(values).rstrip("\n").split("\n")]
        lines.append("")
    return "\n".join(lines)


def _back(msg: str, stage: str, origin: dict[str, tuple[str, int, str]]) -> str | None:
    """A loader's message about a staged file, as ``<csv>:<line>: <column>: ...``; None when
    it is about no field read from a legacy file."""
    text = msg.replace(stage + os.sep, "")
    match = re.match(r"^([^:]+): ([A-Za-z0-9_.\-\[\]() ]+): (.*)$", text)
    if not match:
        return None
    path, rest = match.group(2), match.group(3)
    probe = path
    while probe:
        if probe in origin:
            file, line, column = origin[probe]
            where = f"{file}:{line}" if line else file
            rest = re.sub(r"(machine_config\.[a-z0-9_]+) of " + re.escape(MACHINE_FILE),
                          lambda found: _origin_name(found.group(1), origin), rest)
            return f"{where}: {column or path}: {rest}" if probe == path else f"{where}: {path}: {rest}"
        probe = probe.rpartition(".")[0]
    return None


def _origin_name(path: str, origin: dict[str, tuple[str, int, str]]) -> str:
    """``Machine.csv TankMaxHeat`` for ``machine_config.tank_max_heat``."""
    if path in origin:
        file, _line, column = origin[path]
        return f"{file} {column}"
    return path


def legacy_ids_of(recipes_text: str) -> dict[str, tuple[int, str]]:
    """Recipe id -> (its legacy Recipe.csv Id, Description), from the comments a migration
    writes into the recipes file."""
    out, current = {}, None
    for line in recipes_text.splitlines():
        match = re.match(r"^  ([a-z0-9-]+):\s*$", line)
        if match:
            current = match.group(1)
            continue
        legacy = _LEGACY_ID.match(line)
        if legacy and current:
            out[current] = (int(legacy.group(1)), legacy.group(2) or "")
    return out


# --------------------------------------------------------------------------- writing


class OutputError(Exception):
    """The output directory cannot take the machine (exists without --force, not writable)."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def is_machine_dir(out: Path) -> bool:
    return (out / MACHINE_FILE).exists()


def write(m: Migration, out: str | Path, *, force: bool = False,
          one_time: typing.Callable[[], str] | None = None) -> list[tuple[str, str]]:
    """Write the machine directory ``out``: staged next to it and renamed into place (with
    ``force``, exchanged with the existing one, whose records (audit trail, alarm journal,
    batches), PKI and PLC state are carried over; its users named in Users.csv and all its
    recipes are replaced). Returns the one-time passwords made, (user, password).
    OutputError when ``out`` exists (without ``force``) or is not a machine directory."""
    from opcua_server import records as records_module

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    existing = out.is_dir() and any(out.iterdir())
    if existing and not is_machine_dir(out):
        raise OutputError(f"{out}: not empty and not a machine directory (no {MACHINE_FILE})")
    if existing and not force:
        raise OutputError(f"{out}: holds a machine already ({MACHINE_FILE}); --force replaces its "
                          "configuration, recipes and the users of Users.csv")
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
            _store(url, users, m.recipes)
        _swap(stage, out, existing)
        if m.database_url is not None:
            try:
                _store(url, users, m.recipes)
            except Exception:
                _swap(stage, out, True) if existing else os.rename(out, stage)
                raise
        return made
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap(stage: Path, out: Path, existing: bool) -> None:
    if not existing:
        if out.exists():
            out.rmdir()                                   # an empty directory
        os.rename(stage, out)
    elif not _exchange(stage, out):
        old = out.with_name(f".{out.name}.old")
        os.rename(out, old)
        os.rename(stage, out)
        os.rename(old, stage)


def _store(url: str, users: list, recipes: dict[str, dict[str, Any]]) -> None:
    """Users and recipes into the records at ``url`` in one transaction: the users of the
    legacy set replace those of the same name, the recipes replace all recipes."""
    from sqlalchemy import delete, insert

    from opcua_server import records as records_module

    records = records_module.Records(url)
    try:
        rows = [records_module.validate_recipe(rid, fields) for rid, fields in recipes.items()]
        with records.engine.begin() as db:
            names = [u.name for u in users]
            db.execute(delete(records_module.users).where(records_module.users.c.name.in_(names)))
            db.execute(delete(records_module.recipes))
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


# --------------------------------------------------------------------------- the command


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
    import sys

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
    except (OutputError, OSError) as exc:
        print(f"tempering migrate: {exc}; nothing written", file=sys.stderr)
        return 1
    print(m.report(out), end="")
    print(f"\n{out / MACHINE_FILE}: the migrated machine; run it on the twin with\n"
          f"  tempering run --config {out / MACHINE_FILE}")
    if made:
        print(f"one-time passwords of {', '.join(n for n, _ in made)}: {out}/var/opcua/{ONE_TIME_FILE}")
    return 0
