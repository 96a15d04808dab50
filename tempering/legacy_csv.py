"""Reading the legacy machine's CSV exports: bytes in, rows of cells with their line numbers out.

One job: the formats real exports come in, read the same way for all seven files
(``tempering.migrate``) so each file's rules only deal with cells. Pure: no clock, no sockets.

- Encodings: UTF-8 with or without a byte order mark, else Windows-1252 (what a spreadsheet
  program on Windows writes); a byte that is not text in either is an error naming the file and
  the byte's line.
- Line ends CRLF or LF; fields separated by ``,`` or, when the header has ``;`` but no ``,``, by
  ``;``; fields may be quoted (``"Dark, 70 %"``, ``""`` for a quote).
- Numbers with a decimal point or a decimal comma (``27,5``, usually with ``;`` separators).
- Column names are matched without regard to case, spaces and underscores: ``TankMaxHeat``,
  ``tank_max_heat`` and ``Tank Max Heat`` are one column.
- An empty file, a file with only a header, a row with more or fewer fields than the header
  (a truncated file ends that way), or an unterminated quote: an error naming the file (and
  the line).

Every problem is a message ``<file>:<line>: <column>: <message> (got <value>)`` (``<file>:
<column>: ...`` for the file as a whole), the form of ``plc.modbus.legacy``.

Columns and fields: a model field ``tank_max_heat`` is the column ``TankMaxHeat``
(``column_name``; ``LEGACY_NAMES`` where the legacy name differs), read as a number, an integer,
text or a ``|``-separated list according to the field's type (``field_columns``).
"""

from __future__ import annotations

import csv
import io
import math
import re
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

from plc.configbase import _NOTHING, _show

__all__ = ["LEGACY_NAMES", "LegacyTable", "Row", "column_name", "decode", "field_columns", "key_of",
           "kind_of", "known_columns", "message", "read_table", "show_value", "slug"]

_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_DECIMAL_COMMA = re.compile(r"^[+-]?[0-9]*,[0-9]+$")


def key_of(name: str) -> str:
    """The matching key of a column name or a field: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def message(file: str, line: int | None, column: str, text: str, got: Any = _NOTHING) -> str:
    where = file if line is None else f"{file}:{line}"
    suffix = "" if got is _NOTHING else f" (got {_show(got)})"
    return f"{where}: {column}: {text}{suffix}"


def decode(file: str, data: bytes) -> tuple[str, str]:
    """(text, encoding name) of a legacy file's bytes; ValueError with the message otherwise."""
    if data.startswith(b"\xef\xbb\xbf"):
        encoding, data = "UTF-8 with BOM", data[3:]
    else:
        encoding = "UTF-8"
    try:
        return data.decode("utf-8"), encoding
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(message(file, line, "file", f"neither UTF-8 nor Windows-1252 text "
                                 f"(byte 0x{data[exc.start]:02x})")) from None


@dataclass
class Row:
    """One data row: its cells by column key, and the problems found reading them."""

    file: str
    line: int
    cells: dict[str, str]
    names: dict[str, str]                       # column key -> the name as the header has it
    problems: list[str] = field(default_factory=list)

    def has(self, key: str) -> bool:
        return bool(self.cells.get(key, "").strip())

    def text(self, key: str) -> str:
        return self.cells.get(key, "").strip()

    def column(self, key: str) -> str:
        return self.names.get(key, key)

    def problem(self, key: str, text: str, got: Any = _NOTHING) -> None:
        self.problems.append(message(self.file, self.line, self.column(key), text, got))

    def number(self, key: str) -> float | None:
        """The cell as a number (decimal point or comma); None after a problem."""
        text = self.text(key)
        value = math.nan
        if _DECIMAL_COMMA.match(text):
            text = text.replace(",", ".")
        try:
            value = float(text)
        except ValueError:
            pass
        if not math.isfinite(value):
            self.problem(key, "must be a number", self.text(key))
            return None
        return value

    def integer(self, key: str) -> int | None:
        text = self.text(key)
        if not _INTEGER.match(text):
            self.problem(key, "must be an integer", text)
            return None
        return int(text)

    def flag(self, key: str) -> bool | None:
        text = self.text(key)
        if text not in ("0", "1"):
            self.problem(key, "must be 0 or 1", text)
            return None
        return text == "1"


@dataclass
class LegacyTable:
    file: str
    encoding: str
    delimiter: str
    rows: list[Row]
    columns: list[str]                          # column keys, in header order
    problems: list[str]


def read_table(file: str, data: bytes, known: dict[str, str], required: tuple[str, ...]) -> LegacyTable:
    """The rows of one legacy CSV file. ``known``: column key -> canonical name (an unknown
    column is a problem); ``required``: the keys that must be in the header. Blank lines are
    skipped."""
    try:
        text, encoding = decode(file, data)
    except ValueError as exc:
        return LegacyTable(file, "", ",", [], [], [str(exc)])
    if not text.strip():
        return LegacyTable(file, encoding, ",", [], [], [message(file, None, "file", "is empty")])
    first = text.lstrip("\r\n").split("\n", 1)[0]
    delimiter = ";" if ";" in first and "," not in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    problems: list[str] = []
    rows: list[Row] = []
    columns: list[str] = []
    try:
        header = next(reader)
        while not any(cell.strip() for cell in header):
            header = next(reader)
        names: dict[str, str] = {}
        for cell in header:
            key = key_of(cell)
            if key not in known:
                problems.append(message(file, reader.line_num, "header", "unknown column (known: "
                                        f"{', '.join(known.values())})", cell.strip()))
            elif key in names:
                problems.append(message(file, reader.line_num, "header",
                                        f"column {known[key]} appears twice", cell.strip()))
            names.setdefault(key, cell.strip())
            columns.append(key)
        missing = [known[k] for k in required if k not in names]
        if missing:
            problems.append(message(file, reader.line_num, "header",
                                    f"missing column(s) {', '.join(missing)}"))
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            row = Row(file, reader.line_num, dict(zip(columns, cells)), names)
            if len(cells) != len(columns):
                hint = " (a truncated file?)" if len(cells) < len(columns) else ""
                row.problem("row", f"has {len(cells)} fields, the header has {len(columns)}{hint}")
            rows.append(row)
    except StopIteration:
        problems.append(message(file, None, "file", "is empty"))
    except csv.Error as exc:
        problems.append(message(file, reader.line_num, "row", f"{exc} (a truncated file?)"))
    if not problems and not rows:
        problems.append(message(file, None, "file", "has a header but no rows"))
    return LegacyTable(file, encoding, delimiter, rows, columns, problems)


# --------------------------------------------------------------------------- columns and fields

#: Legacy column names that are not the field's name in CamelCase.
LEGACY_NAMES = {"number": "ZoneNumber", "pedal": "PedalMode"}


def column_name(name: str) -> str:
    """The legacy column name of a field: ``tank_max_heat`` -> ``TankMaxHeat``."""
    if name in LEGACY_NAMES:
        return LEGACY_NAMES[name]
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def kind_of(annotation: Any) -> str:
    """How a model field's cell is read: number, integer, text or outputs (a ``|`` list)."""
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


def field_columns(model: type, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """Column key -> (field, kind) of a pydantic model's fields."""
    return {key_of(column_name(name)): (name, kind_of(f.annotation))
            for name, f in model.model_fields.items() if name not in skip}


def known_columns(fields: dict[str, tuple[str, str]], *extra: str) -> dict[str, str]:
    """Column key -> canonical name: Id, IsActive, ``extra`` and the fields' columns."""
    known = {key_of(c): c for c in ("Id", "IsActive", *extra)}
    known.update({key: column_name(name) for key, (name, _) in fields.items()})
    return known


def slug(text: str) -> str:
    """A recipe or machine id from a name: ``Dark 70 %`` -> ``dark-70``, ``Crème`` -> ``creme``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def show_value(value: Any) -> str:
    """A converted value for the report: lists as ``[a, b]``, text as it is."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return _show(value) if not isinstance(value, str) else value
