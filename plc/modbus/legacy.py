"""Import of the legacy ``Mapping.csv`` into a register map.

One job: CSV text in, validated ``PointMap`` points out, and the register-map YAML text that
``regmap.load_register_map`` reads back to the same points. Pure: no clock, no sockets; the
command ``tempering import-mapping`` does the file writing.

The CSV: a header row, then one row per point; column names are case-insensitive, separated
by ``,`` (or ``;`` when the header has no comma).

==================  ==========================================================  =============
column              meaning                                                     field
==================  ==========================================================  =============
Id                  integer, unique                                             (checked only)
Name                a point of the PLC I/O contract                             ``name``
ModbusAddress       0-based protocol address 0..65535                           ``address``
IsReadOperation     1 for an input (function 1-4), 0 for an output (5, 6, 15,   (checked only)
                    16); must agree with FunctionCode
BitNumbers          bit numbers of a bool packed in a register, pipe-separated  ``bits``
                    (``0|1``); may be empty
FunctionCode        1, 2, 3, 4, 5, 6, 15, 16                                    ``function``
DataType            bool, int16, uint16, int32, uint32, float32 (also the       ``type``
                    IEC names BOOL, INT, UINT, DINT, UDINT, REAL and bit,
                    boolean, word, dword, float); case-insensitive; empty: bool
Description         free text                                                   ``description``
IsActive            0 or 1; rows with 0 are skipped                             --
Link (optional)     link name; empty or absent: the ``default_link``            ``link``
UnitId (optional)   unit id 1..247; empty or absent: the ``default_unit``       ``unit``
WordOrder (opt.)    ABCD, CDAB, BADC, DCBA; empty or absent: ABCD               ``order``
Scale, Offset (o.)  numbers (decimal point or comma); empty or absent: 1 and 0                          ``scale``, ``offset``
Unit (optional)     engineering unit                                            ``eu``
==================  ==========================================================  =============

Booleans are ``0`` / ``1`` only. Every problem is reported at once, as
``<file>:<line>: <column>: <message> (got <value>)``: first what the CSV itself gets wrong,
then the very checks of a YAML register map (``PointMap`` per row, ``regmap.check_map`` over
the active rows: the I/O contract, overlapping writes), each mapped back to its row. A PLC
point no active row maps is reported as ``<file>: Name: ...``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError

from ..configbase import _NOTHING, ConfigError, _Loader, _problems, _read_text, _show
from . import pdu
from .codec import DataType, WordOrder
from .regmap import PointMap, _check_map

__all__ = ["COLUMNS", "OPTIONAL_COLUMNS", "dump_register_map", "import_mapping", "legacy_rows",
           "parse_mapping"]

#: Required columns, in their canonical spelling (matched case-insensitively).
COLUMNS = ("Id", "Name", "ModbusAddress", "IsReadOperation", "BitNumbers", "FunctionCode",
           "DataType", "Description", "IsActive")
#: Optional extension columns.
OPTIONAL_COLUMNS = ("Link", "UnitId", "WordOrder", "Scale", "Offset", "Unit")

#: PointMap field -> the column it comes from.
_COLUMN_OF = {"name": "Name", "address": "ModbusAddress", "bits": "BitNumbers",
              "function": "FunctionCode", "type": "DataType", "description": "Description",
              "link": "Link", "unit": "UnitId", "order": "WordOrder", "scale": "Scale",
              "offset": "Offset", "eu": "Unit"}

_TYPE_NAMES = {
    **{t.value: t for t in DataType},
    "bit": DataType.BOOL, "boolean": DataType.BOOL, "word": DataType.UINT16,
    "int": DataType.INT16, "uint": DataType.UINT16, "dint": DataType.INT32,
    "udint": DataType.UINT32, "dword": DataType.UINT32, "real": DataType.FLOAT32,
    "float": DataType.FLOAT32,
}
_TYPES_SHOWN = (", ".join(t.value for t in DataType)
                + " (or BOOL, INT, UINT, DINT, UDINT, REAL, bit, boolean, word, dword, float)")
_INTEGER = re.compile(r"^[+-]?[0-9]+$")


class _Row:
    """One CSV row being read: its cells by canonical column, and its problems."""

    def __init__(self, file: str, line: int, cells: dict[str, str]):
        self.file, self.line, self.cells = file, line, cells
        self.problems: list[tuple[float, str]] = []     # (line, message)

    def problem(self, column: str, message: str, got: Any = _NOTHING) -> None:
        self.problems.append((self.line, _message(self.file, self.line, column, message, got)))

    def text(self, column: str) -> str:
        return self.cells.get(column, "").strip()

    def integer(self, column: str, default: int | None = None) -> int | None:
        text = self.text(column)
        if not text and default is not None:
            return default
        if not _INTEGER.match(text):
            self.problem(column, "must be an integer", text)
            return None
        return int(text)

    def number(self, column: str, default: float) -> float | None:
        text = self.text(column)
        if not text:
            return default
        if re.match(r"^[+-]?[0-9]*,[0-9]+$", text):
            text = text.replace(",", ".")           # a decimal comma (a ';'-separated export)
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            self.problem(column, "must be a finite number", text)
            return None
        return value

    def flag(self, column: str) -> bool | None:
        text = self.text(column)
        if text not in ("0", "1"):
            self.problem(column, "must be 0 or 1", text)
            return None
        return text == "1"

    def bits(self) -> tuple[int, ...] | None:
        text = self.text("BitNumbers")
        if not text:
            return ()
        parts = [part.strip() for part in text.split("|")]
        if not all(_INTEGER.match(part) for part in parts):
            self.problem("BitNumbers", "must be bit numbers separated by | (e.g. 0|1)", text)
            return None
        return tuple(int(part) for part in parts)

    def choice(self, column: str, names: dict[str, Any], default: Any, shown: str) -> Any:
        text = self.text(column)
        if not text:
            return default
        if text.lower() not in names:
            self.problem(column, f"must be one of {shown}", text)
            return None
        return names[text.lower()]


def _message(file: str, line: int | None, column: str, message: str, got: Any = _NOTHING) -> str:
    """``<file>:<line>: <column>: <message> (got <value>)`` (``<file>: <column>: ...`` for the
    file as a whole)."""
    where = file if line is None else f"{file}:{line}"
    suffix = "" if got is _NOTHING else f" (got {_show(got)})"
    return f"{where}: {column}: {message}{suffix}"


def _header(file: str, row: list[str]) -> tuple[list[str | None], list[str]]:
    """The canonical column of each header cell (None: unknown), and the header's problems."""
    known = {c.lower(): c for c in (*COLUMNS, *OPTIONAL_COLUMNS)}
    columns: list[str | None] = []
    problems: list[str] = []
    for cell in row:
        name = known.get(cell.strip().lower())
        if name is None:
            problems.append(_message(file, 1, "header", "unknown column (known: "
                                     f"{', '.join((*COLUMNS, *OPTIONAL_COLUMNS))})", cell))
        elif name in columns:
            problems.append(_message(file, 1, "header", f"column {name} appears twice", cell))
        columns.append(name)
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        problems.append(_message(file, 1, "header", f"missing column(s) {', '.join(missing)}"))
    return columns, problems


def _point(row: _Row, default_link: str, default_unit: int) -> PointMap | None:
    """The point of an active row, or None after recording the row's problems."""
    row.integer("Id")
    is_read = row.flag("IsReadOperation")
    fields = {
        "name": row.text("Name"),
        "link": row.text("Link") or default_link,
        "unit": row.integer("UnitId", default_unit),
        "function": row.integer("FunctionCode"),
        "address": row.integer("ModbusAddress"),
        "bits": row.bits(),
        "type": row.choice("DataType", _TYPE_NAMES, DataType.BOOL, _TYPES_SHOWN),
        "order": row.choice("WordOrder", {o.value.lower(): o for o in WordOrder}, WordOrder.ABCD,
                            ", ".join(o.value for o in WordOrder)),
        "scale": row.number("Scale", 1.0),
        "offset": row.number("Offset", 0.0),
        "eu": row.text("Unit"),
        "description": row.text("Description"),
    }
    function = fields["function"]
    if is_read is not None and function in pdu.FUNCTIONS \
            and is_read != (function in pdu.READ_FUNCTIONS):
        kind = "a read" if function in pdu.READ_FUNCTIONS else "a write"
        row.problem("IsReadOperation", f"must be {int(not is_read)} for function code "
                    f"{function} ({kind})", row.text("IsReadOperation"))
    if row.problems:
        return None
    try:
        return PointMap.model_validate(fields)
    except ValidationError as exc:
        for loc, message, got in _problems(exc):
            column = _COLUMN_OF.get(str(loc[0]), "row") if loc else "row"
            row.problem(column, message, row.text(column) if column in row.cells else got)
        return None


def parse_mapping(text: str, file: str = "Mapping.csv", default_link: str = "io",
                  default_unit: int = 1) -> tuple[PointMap, ...]:
    """The points of the active rows of Mapping.csv ``text`` (``file`` names it in the
    messages), validated like a register-map file. Raises ConfigError with every problem."""
    if not 1 <= default_unit <= 247:
        raise ConfigError(file, [f"{file}: the default unit id must be 1..247 "
                                 f"(got {default_unit})"])
    text = text.removeprefix("\ufeff")              # a BOM from a spreadsheet program
    first = text.split("\n", 1)[0]
    delimiter = ";" if ";" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise ConfigError(file, [_message(file, 1, "header", "missing: the first row names "
                                              f"the columns {', '.join(COLUMNS)}")])
        columns, messages = _header(file, header)
        if messages:
            raise ConfigError(file, messages)
        rows: list[_Row] = []
        for cells in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue                                   # a blank line
            row = _Row(file, line, {c: v for c, v in zip(columns, cells) if c})
            rows.append(row)
            if len(cells) != len(columns):
                row.problem("row", f"has {len(cells)} fields, the header has {len(columns)}")
    except csv.Error as exc:
        raise ConfigError(file, [_message(file, reader.line_num, "row", str(exc))]) from None

    messages: list[tuple[float, str]] = []
    valid: list[tuple[int, PointMap]] = []
    bad_names: set[str] = set()
    ids: dict[int, int] = {}
    for row in rows:
        if row.problems:
            messages += row.problems
            continue
        active = row.flag("IsActive")
        if active is False:
            continue
        ident = row.text("Id")
        if _INTEGER.match(ident):
            if int(ident) in ids:
                row.problem("Id", f"already used on line {ids[int(ident)]}", ident)
            ids.setdefault(int(ident), row.line)
        point = _point(row, default_link, default_unit)
        if point is None:
            bad_names.add(row.text("Name"))
        else:
            valid.append((row.line, point))
        messages += row.problems
    by_line = {row.line: row for row in rows}
    for loc, message, got in _check_map(valid, None, bad_names, ref=lambda line: f"line {line}"):
        if loc:
            line, column = loc[0], _COLUMN_OF[str(loc[1])]
            cells = by_line[line].cells
            got = cells[column].strip() if column in cells and got is not _NOTHING else got
            messages.append((line, _message(file, line, column, message, got)))
        else:
            messages.append((math.inf, _message(file, None, "Name", message + " (no active row "
                                                "names them)", got)))
    if messages:
        raise ConfigError(file, [m for _, m in sorted(messages, key=lambda item: item[0])])
    return tuple(point for _, point in valid)


def import_mapping(csv_path: str | Path, default_link: str = "io",
                   default_unit: int = 1) -> tuple[PointMap, ...]:
    """The points of the legacy Mapping.csv at ``csv_path`` (see the module docstring); rows
    without a Link / UnitId get ``default_link`` / ``default_unit``. Raises ConfigError."""
    return parse_mapping(_read_text(csv_path, "utf-8"), str(csv_path), default_link,
                         default_unit)


def legacy_rows(points: Sequence[PointMap]) -> list[dict[str, str]]:
    """The Mapping.csv rows (column -> cell, every column of COLUMNS and OPTIONAL_COLUMNS) of
    ``points``, Ids from 1: what ``parse_mapping`` reads back to the same points."""
    return [{
        "Id": str(i), "Name": p.name, "ModbusAddress": str(p.address),
        "IsReadOperation": "0" if p.is_output else "1",
        "BitNumbers": "|".join(map(str, p.bits)), "FunctionCode": str(p.function),
        "DataType": p.type.value, "Description": p.description, "IsActive": "1",
        "Link": p.link, "UnitId": str(p.unit), "WordOrder": p.order.value,
        "Scale": repr(p.scale), "Offset": repr(p.offset), "Unit": p.eu,
    } for i, p in enumerate(points, start=1)]


# --------------------------------------------------------------------------- register-map YAML


class _Dumper(yaml.SafeDumper):
    """Quotes every string the YAML 1.2 reader of ``load_register_map`` would not read back
    as a string (``0o17``, ``1e3``), besides those PyYAML quotes itself (``yes``, ``1.5``)."""


_READER = _Loader("")                # only its resolver is used: the tag a plain scalar gets


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    as_read = _READER.resolve(yaml.ScalarNode, value, (True, False))
    style = '"' if as_read != "tag:yaml.org,2002:str" else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)

_DEFAULTS = {name: field.default for name, field in PointMap.model_fields.items()
             if not field.is_required()}


def _entry(p: PointMap) -> str:
    data: dict[str, Any] = {}
    for name in PointMap.model_fields:
        value = getattr(p, name)
        if name in _DEFAULTS and value == _DEFAULTS[name]:
            continue
        if isinstance(value, (DataType, WordOrder)):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        data[name] = value
    return yaml.dump(data, Dumper=_Dumper, default_flow_style=True, sort_keys=False,
                     allow_unicode=True, width=10**6).strip()


def dump_register_map(points: Sequence[PointMap], source: str = "") -> str:
    """The register-map YAML of ``points`` (fields at their default left out), one point per
    line; ``load_register_map`` reads it back to the same points. ``source`` (the CSV it
    came from) is named in the header comment."""
    origin = f" {source}" if source else ""
    lines = [
        f"# Register map imported from the legacy Mapping.csv{origin}",
        "# by `tempering import-mapping`. Fields and their meaning: see config/register-map.yaml",
        "# and plc/modbus/regmap.py; check with `tempering check-config` once fieldbus.map_file",
        "# of the machine file names this file.",
        "",
        "points:",
    ]
    lines += [f"  - {_entry(p)}" for p in points]
    return "\n".join(lines) + "\n"
