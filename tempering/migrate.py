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

``plan(legacy_dir, ...) -> Migration`` reads the files, converts them, validates the result in
a temporary directory and hashes the plain passwords (raises MigrationError); it writes nothing.
``tempering.migrate_cli.write`` puts a Migration into its machine directory. The files' text
and the tracing of messages back to CSV cells are in ``tempering.migrate_files``; reading the
CSV files in ``tempering.legacy_csv``.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opcua_server.config import DEFAULT_CONFIG, load
from plc.config import ConfigError, ErrorSettings, MachineParams, Recipe, SystemSettings, ZoneConfig
from plc.configbase import _read_mapping, _show
from plc.contract import ZONE_NUMBERS
from plc.modbus.legacy import COLUMNS, OPTIONAL_COLUMNS, dump_register_map, parse_mapping

from .legacy_csv import (LegacyTable, Row, column_name, decode, field_columns, key_of, known_columns,
                         message, read_table, show_value, slug)
from .migrate_files import Origin, machine_text, recipes_text, trace_back

__all__ = ["FILES", "Migration", "MigrationError", "UserPlan", "plan"]

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
#: The single-record files: file, section of the machine file, its model, extra columns.
SINGLES = (("Machine.csv", "machine_config", MachineParams, ("Name", "DefaultRecipe")),
           ("Screen.csv", "system", SystemSettings, DISPLAY_COLUMNS),
           ("ErrorSettings.csv", "error_settings", ErrorSettings, ()))
_MACHINE_DEFAULT = "the default machine's"
_LEGACY_DEFAULT = "the legacy default"


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



# --------------------------------------------------------------------------- the plan


def plan(legacy_dir: str | Path, *, machine_id: str, fieldbus: str = "rtu",
         database_url: str | None = None) -> Migration:
    """Read, convert and validate the legacy set in ``legacy_dir``. ``fieldbus``: ``rtu`` (the
    serial line of Screen.csv) or ``tcp:HOST:PORT`` (a Modbus TCP gateway or the twin).
    Raises MigrationError with every problem."""
    legacy = Path(legacy_dir)
    if not legacy.is_dir():
        raise MigrationError([f"{legacy}: not a directory"])
    run = _Run(legacy, Migration(str(legacy_dir), machine_id, "", "", "", {}, [], database_url))
    if not re.match(r"^[a-z0-9-]+$", machine_id or ""):
        run.problems.append(f"--machine-id: lower-case letters, digits and '-' only (got {machine_id!r})")
    run.single_records()
    run.zones()
    run.recipes()
    run.machine_section(fieldbus)
    run.mapping()
    run.users()
    return run.validated()


class _Run:
    """One migration under way: the legacy files' bytes, the machine being built (the default
    machine's sections, overlaid with what the legacy files say), where each field came from,
    and every problem so far."""

    def __init__(self, legacy: Path, m: Migration):
        self.legacy, self.m = legacy, m
        self.problems: list[str] = []
        self.default = _read_mapping(DEFAULT_CONFIG)
        self.machine = copy.deepcopy(self.default)
        self.tables: dict[str, LegacyTable] = {}
        self.origin: Origin = {}
        self.records: dict[str, Row] = {}            # single-record file -> its record
        self.recipe_values: dict[str, dict[str, Any]] = {}
        self.recipe_rows: dict[str, Row] = {}
        self.legacy_ids: dict[str, int] = {}
        self.raw = {name: self._bytes(name) for name in FILES}

    def _bytes(self, name: str) -> bytes | None:
        try:
            return (self.legacy / name).read_bytes()
        except FileNotFoundError:
            self.problems.append(f"{name}: missing from {self.legacy}")
        except OSError as exc:
            self.problems.append(f"{name}: cannot read: {exc.strerror or exc}")
        return None

    def table(self, name: str, fields: dict, *extra: str,
              required: tuple[str, ...] = ("id",)) -> LegacyTable | None:
        """The file's rows, or None (missing, or problems with the file as a whole)."""
        if self.raw[name] is None:
            return None
        t = read_table(name, self.raw[name], known_columns(fields, *extra), required)
        self.tables[name] = t
        self.problems.extend(t.problems)
        return None if t.problems else t

    def row_problems(self, t: LegacyTable) -> None:
        for row in t.rows:
            self.problems.extend(row.problems)

    def where(self, row: Row, key: str, fname: str) -> str:
        return row.column(key) if key in row.names else column_name(fname)

    # -- Machine.csv, Screen.csv, ErrorSettings.csv -------------------------------------------

    def single_records(self) -> None:
        for name, section, model, extra in SINGLES:
            fields = field_columns(model)
            t = self.table(name, fields, *extra)
            if t is None:
                continue
            row = _single(self.m, t, self.problems)
            if row is not None:
                self.records[name] = row
                values = {}
                for key, (fname, kind) in fields.items():
                    path = f"{section}.{fname}"
                    self.origin[path] = (name, row.line, self.where(row, key, fname))
                    if fname == "parity" and row.has(key):
                        values[fname] = self._choice(row, key, PARITY)
                    else:
                        values[fname] = _value(self.m, row, key, fname, kind,
                                               self.default[section].get(fname), path)
                if row.problems:          # the default machine's section stands in, unreported
                    _forget(self.origin, section)
                else:
                    self.machine[section] = values
                for column in extra:
                    if column in DISPLAY_COLUMNS and key_of(column) in row.names:
                        self.m.dropped.append(
                            f"{name}: {row.column(key_of(column))}: the old panel's display setting "
                            f"({row.text(key_of(column)) or 'empty'}); no counterpart here")
            self.row_problems(t)

    def _choice(self, row: Row, key: str, codes: dict[str, str]) -> str:
        """A cell that is a legacy code (``0``) or the name itself (``none``)."""
        text = row.text(key).lower()
        if text in codes:
            self.m.converted.append(f"{row.file}:{row.line}: {row.column(key)}: {text} -> {codes[text]}")
            return codes[text]
        return text

    # -- Configuration.csv ----------------------------------------------------------------------

    def zones(self) -> None:
        fields = field_columns(ZoneConfig)
        t = self.table("Configuration.csv", fields, "ZoneName", required=("id", "zonenumber"))
        if t is None:
            return
        zones: dict[str, Any] = {}
        seen: dict[int, int] = {}
        for row in _active(self.m, t, lambda row: f"zone {row.text('zonenumber')}"):
            number = row.integer("zonenumber")
            zone = next((z for z, n in ZONE_NUMBERS.items() if n == number), None)
            if number is not None and zone is None:
                row.problem("zonenumber", "must be a zone number 1..4 (1 tank bottom, 2 tank wall, "
                                          "3 pump, 4 fountain)", row.text("zonenumber"))
            elif number in seen:
                row.problem("zonenumber", f"zone {number} again (first on line {seen[number]})", number)
            if row.problems:
                continue
            seen[number] = row.line
            values: dict[str, Any] = {"number": number}
            for key, (fname, kind) in fields.items():
                path = f"zones.{zone}.{fname}"
                self.origin[path] = (t.file, row.line, self.where(row, key, fname))
                if fname != "number":
                    values[fname] = _value(self.m, row, key, fname, kind,
                                           self.default["zones"][zone][fname], path)
            if row.problems:
                _forget(self.origin, f"zones.{zone}")
                continue
            zones[zone] = values
            self.origin[f"zones.{zone}"] = (t.file, row.line, "row")
        self.row_problems(t)
        if not any(row.problems for row in t.rows):
            for zone, number in ZONE_NUMBERS.items():
                if zone not in zones:
                    self.problems.append(message(t.file, None, "ZoneNumber", f"no active record for "
                                                 f"zone {number} ({zone.replace('_', ' ')})"))
        self.machine["zones"] = {**self.default["zones"], **zones}

    # -- Recipe.csv -----------------------------------------------------------------------------

    def recipes(self) -> None:
        fields = field_columns(Recipe, skip=("acceptance",))
        t = self.table("Recipe.csv", fields, "Code", "Description",
                       required=("id", "name", "heatinggoal", "coolinggoal", "pouringgoal"))
        if t is None:
            return
        rows = _active(self.m, t, lambda row: f"recipe {row.text('name')!r}")
        ids: dict[int, int] = {}
        for row in rows:
            legacy_id = row.integer("id")
            if legacy_id in ids:
                row.problem("id", f"already used on line {ids[legacy_id]}", legacy_id)
            ids.setdefault(legacy_id, row.line)
            code = row.text("code") or slug(row.text("name")) or f"r{row.text('id')}"
            if not re.match(r"^[a-z0-9-]+$", code):
                row.problem("code", "lower-case letters, digits and '-' only", code)
            if code in self.recipe_rows:
                row.problem("name", f"gives the recipe id {code!r} of line {self.recipe_rows[code].line} "
                                    "(names must differ, or give a Code column)", row.text("name"))
                continue
            if not row.has("code"):
                self.m.converted.append(f"{t.file}:{row.line}: Name: {row.text('name')!r} -> recipe id {code}")
            values = {fname: self._recipe_field(t, row, code, key, fname, kind)
                      for key, (fname, kind) in fields.items()}
            if values["working_max"] is None:
                self._working_max(t, row, code, values)
            self.recipe_rows[code] = row
            if row.problems:
                _forget(self.origin, f"recipes.{code}")
                continue
            self.recipe_values[code] = values
            if legacy_id is not None:
                self.legacy_ids[code] = legacy_id
            self.origin[f"recipes.{code}"] = (t.file, row.line, "row")
        _flags_converted(self.m, t, [k for k, (f, _) in fields.items() if f.endswith("_enabled")], rows)
        self.row_problems(t)
        if not self.recipe_values and not any(row.problems for row in t.rows):
            self.problems.append(message(t.file, None, "file", "no active recipe"))

    def _recipe_field(self, t: LegacyTable, row: Row, code: str, key: str, fname: str, kind: str) -> Any:
        path = f"recipes.{code}.{fname}"
        self.origin[path] = (t.file, row.line, self.where(row, key, fname))
        if fname.endswith("_enabled"):
            return row.flag(key) if row.has(key) else _value(self.m, row, key, fname, "flag", False,
                                                             path, _LEGACY_DEFAULT)
        if fname in ("pedal_on_time", "pedal_off_time") and row.has(key):
            ms = row.number(key)
            if ms is None:
                return None
            self.m.converted.append(f"{t.file}:{row.line}: {row.column(key)}: {row.text(key)} ms "
                                    f"-> {fname} {_show(ms / 1000.0)} s")
            return ms / 1000.0
        if fname == "pedal" and row.has(key):
            return self._choice(row, key, PEDAL)
        if fname == "working_max" and not row.has(key):
            return None                                  # from the goals, once they are read
        return _value(self.m, row, key, fname, kind, RECIPE_DEFAULTS.get(fname), path,
                      _LEGACY_DEFAULT if fname in RECIPE_DEFAULTS else _MACHINE_DEFAULT)

    def _working_max(self, t: LegacyTable, row: Row, code: str, values: dict[str, Any]) -> None:
        heating, pouring = values.get("heating_goal"), values.get("pouring_goal")
        if isinstance(heating, (int, float)) and isinstance(pouring, (int, float)):
            values["working_max"] = wm = round(min(pouring + WORKING_MAX_MARGIN_K, heating), 3)
            self.m.defaults.append(f"{t.file}:{row.line}: WorkingMax: absent -> recipes.{code}."
                                   f"working_max {_show(wm)} (the pouring goal + "
                                   f"{_show(WORKING_MAX_MARGIN_K)} K, at most the heating goal)")

    # -- the machine section, scan, fieldbus; the sections without a legacy counterpart -------

    def machine_section(self, fieldbus: str) -> None:
        m, default, row = self.m, self.default, self.records.get("Machine.csv")
        section = {**default["machine"], "id": m.machine_id, "state_file": "var/plc-state.json",
                   "recipes_file": RECIPES_FILE, "work_dir": "."}
        self.origin["machine.name"] = self.origin["machine.default_recipe"] = (
            "Machine.csv", row.line if row else 0, "")
        if row is not None and row.has("name"):
            section["name"] = row.text("name")
            self.origin["machine.name"] = ("Machine.csv", row.line, row.column("name"))
        else:
            section["name"] = f"Tempering machine {m.machine_id} (migrated)"
            m.defaults.append(f"Machine.csv: Name: absent -> machine.name {section['name']!r}")
        if row is not None and row.has("defaultrecipe"):
            section["default_recipe"] = row.text("defaultrecipe")
            self.origin["machine.default_recipe"] = ("Machine.csv", row.line, row.column("defaultrecipe"))
        else:
            ids = self.legacy_ids
            first = min(self.recipe_values, key=lambda c: (ids.get(c, 0), c)) if self.recipe_values else "none"
            section["default_recipe"] = first
            m.defaults.append(f"Machine.csv: DefaultRecipe: absent -> machine.default_recipe "
                              f"{first} (the active recipe with the lowest Id)")
        self.machine["machine"] = section
        self.machine["scan"] = {k: v for k, v in default["scan"].items() if k != "period_ms"}
        m.defaults.append("scan: period_ms left out: the scan period is Screen.csv's SendingInterval "
                          f"({_show(self.machine['system'].get('sending_interval'))} ms); the watchdog "
                          "and PWM settings are the default machine's")
        self.machine["fieldbus"] = _fieldbus(default, self.machine.get("system", {}), fieldbus, m,
                                             self.problems)
        if m.database_url:
            self.machine["opcua"] = {**default["opcua"], "database_url": m.database_url}
        for name in ("historian", "opcua"):
            m.defaults.append(f"{name}: the default machine's section (no legacy counterpart)")
        self.machine.pop("twin", None)
        m.defaults.append("twin: left out (the simulated machine is the default twin)")

    # -- Mapping.csv: plc.modbus.legacy's import ----------------------------------------------

    def mapping(self) -> None:
        raw, m = self.raw["Mapping.csv"], self.m
        if raw is None:
            return
        try:
            text, _ = decode("Mapping.csv", raw)
            if not text.strip():
                raise ValueError(message("Mapping.csv", None, "file", "is empty"))
            points = parse_mapping(text, "Mapping.csv")
        except ConfigError as exc:
            self.problems.extend(exc.messages)
            return
        except ValueError as exc:
            self.problems.append(str(exc))
            return
        m.map_yaml = dump_register_map(points, "Mapping.csv")
        t = read_table("Mapping.csv", raw, {key_of(c): c for c in (*COLUMNS, *OPTIONAL_COLUMNS)}, ())
        self.tables["Mapping.csv"] = t
        for row in t.rows:
            if row.text("isactive") == "0":
                m.skipped.append(f"Mapping.csv:{row.line}: {row.text('name')}: inactive (IsActive 0)")
            elif "|" in row.text("bitnumbers"):
                m.converted.append(f"Mapping.csv:{row.line}: BitNumbers: {row.text('bitnumbers')!r} "
                                   f"-> bits [{', '.join(row.text('bitnumbers').split('|'))}]")
        _flags_converted(m, t, ["isreadoperation", "isactive"], t.rows)

    # -- Users.csv ------------------------------------------------------------------------------

    def users(self) -> None:
        from opcua_server import records as records_module

        t = self.table("Users.csv", {}, "Username", "Password", "Role", "FullName", "Email",
                       "MustChangePassword", required=("id", "username", "password", "role"))
        if t is None:
            return
        m = self.m
        names: dict[str, int] = {}
        for row in _active(m, t, lambda row: f"user {row.text('username')!r}"):
            name, role = row.text("username"), row.text("role").lower()
            if not re.match(records_module.USER_NAME.pattern, name):
                row.problem("username", "letters, digits and . _ @ - only, 1..64 characters", name)
            elif name in names:
                row.problem("username", f"already used on line {names[name]}", name)
            names.setdefault(name, row.line)
            if role not in ROLES:
                row.problem("role", f"must be one of {', '.join(ROLES)}", row.text("role"))
            pending = bool(row.has("mustchangepassword") and row.flag("mustchangepassword"))
            if row.problems:
                continue
            password = row.cells.get("password", "")
            if password.startswith("scrypt$") and records_module.hash_cost(password) is not None:
                m.users.append(UserPlan(row.line, name, role, "scrypt", password, pending,
                                        "scrypt hash of this program, kept"
                                        + (" (must set a new password)" if pending else "")))
            else:
                legacy = records_module.legacy_password(password)
                must = legacy.password_hash is None or legacy.must_change or pending
                m.users.append(UserPlan(row.line, name, role, legacy.scheme, legacy.password_hash,
                                        must, legacy.note))
            if row.text("role") != role:
                m.converted.append(f"Users.csv:{row.line}: Role: {row.text('role')!r} -> {role}")
            for column in ("fullname", "email"):
                if row.has(column):
                    m.dropped.append(f"Users.csv:{row.line}: {row.column(column)}: not kept (a user "
                                     "here is a name, a role and a password)")
        self.row_problems(t)
        if m.users and not any(u.role == "admin" for u in m.users):
            m.defaults.append("Users.csv: no admin: the server makes one (admin) at first start, "
                              "its password in var/opcua/initial-admin-password")

    # -- the whole, through the loaders of a hand-written machine -----------------------------

    def validated(self) -> Migration:
        """The staged files loaded by ``opcua_server.config.load``. Where a file or a row could
        not be read, the default machine's part stands in so the rest is checked too; messages
        about what stood in are left out."""
        m = self.m
        for name, t in self.tables.items():
            used = len([r for r in t.rows if r.text("isactive") in ("", "1")])
            m.counts.append((name, used, len(t.rows) - used, f"{t.encoding}, '{t.delimiter}' separated"))
        m.machine_yaml = machine_text(self.machine, m.legacy_dir)
        m.recipes_yaml = recipes_text(self.recipe_values, self.legacy_ids, self.recipe_rows, m.legacy_dir)
        book = None
        if self.recipe_values:
            with tempfile.TemporaryDirectory(prefix="tempering-migrate-") as stage:
                files = {MACHINE_FILE: m.machine_yaml, RECIPES_FILE: m.recipes_yaml,
                         MAP_FILE: m.map_yaml or (DEFAULT_CONFIG.parent / MAP_FILE).read_text()}
                for fname, text in files.items():
                    Path(stage, fname).write_text(text, encoding="utf-8")
                try:
                    _, book = load(Path(stage) / MACHINE_FILE)
                except ConfigError as exc:
                    for msg in exc.messages:
                        traced = trace_back(msg, stage, self.origin, MACHINE_FILE)
                        if traced is not None or not self.problems:
                            self.problems.append(traced or msg.replace(stage + os.sep, ""))
        if self.problems:
            raise MigrationError(sorted(self.problems, key=_file_order))
        m.recipes = {rid: r.model_dump() for rid, r in book.recipes.items()}
        return m


# --------------------------------------------------------------------------- rows and cells


def _value(m: Migration, row: Row, key: str, name: str, kind: str, default: Any, path: str,
           default_source: str = _MACHINE_DEFAULT) -> Any:
    """One cell as a field's value; the default (reported) when absent or empty."""
    column = row.column(key)
    if kind == "outputs" and key in row.names and not row.has(key):
        return ()                                  # an empty list of outputs: none
    if not row.has(key):
        shown = column_name(name) if key not in row.names else column
        state = "empty" if key in row.names else "absent"
        m.defaults.append(f"{row.file}:{row.line}: {shown}: {state} -> {path} "
                          f"{show_value(default)} ({default_source})")
        return default
    text = row.text(key)
    if kind == "number":
        value = row.number(key)
        if value is not None and "," in text:
            m.converted.append(f"{row.file}:{row.line}: {column}: decimal comma {text!r} -> "
                               f"{show_value(value)}")
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
            m.converted.append(f"{row.file}:{row.line}: {column}: {text!r} -> {list(names)}")
        return names
    return text


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



def _forget(origin: Origin, prefix: str) -> None:
    for key in [k for k in origin if k == prefix or k.startswith(prefix + ".")]:
        del origin[key]


def _file_order(problem: str) -> tuple[int, float]:
    """Problems by legacy file (in FILES order), then line."""
    match = re.match(r"^([A-Za-z]+\.csv)(?::(\d+))?", problem)
    if not match:
        return (len(FILES), 0)
    index = FILES.index(match.group(1)) if match.group(1) in FILES else len(FILES)
    return (index, int(match.group(2)) if match.group(2) else math.inf)


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
