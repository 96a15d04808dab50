"""plc.modbus.legacy and `tempering import-mapping`: the legacy Mapping.csv to a register map.

A good Mapping.csv (the default register map written as the legacy file) imports to the very
points of config/register-map.yaml and round-trips through the YAML; each kind of bad row
gives its exact ``file:line: column: message``; the command writes nothing on error.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest

from plc.config import ConfigError
from plc.contract import INPUT_SPECS, OUTPUT_SPECS
from plc.modbus.legacy import (COLUMNS, OPTIONAL_COLUMNS, dump_register_map, import_mapping, legacy_rows,
                               parse_mapping)
from plc.modbus.regmap import PointMap, load_register_map

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MAP_FILE = ROOT / "config" / "register-map.yaml"
DEFAULT_MAP = load_register_map(MAP_FILE)
HEADER = [*COLUMNS, *OPTIONAL_COLUMNS]
LINE = {p.name: i + 2 for i, p in enumerate(DEFAULT_MAP)}     # the header is line 1


def legacy_row(i: int, p: PointMap) -> dict[str, str]:
    return {**legacy_rows([p])[0], "Id": str(i)}


def csv_text(rows: list[dict[str, str]], header=HEADER, delimiter=",", spelled=None) -> str:
    """The CSV of ``rows`` with the columns ``header`` (written as ``spelled`` if given)."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(spelled or header)
    for row in rows:
        writer.writerow([row.get(column, "") for column in header])
    return out.getvalue()


def default_rows() -> list[dict[str, str]]:
    return [legacy_row(i, p) for i, p in enumerate(DEFAULT_MAP, start=1)]


def errors(tmp_path: Path, text: str, **kw) -> list[str]:
    file = tmp_path / "Mapping.csv"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        import_mapping(file, **kw)
    assert info.value.path == str(file)
    assert all(m.startswith(f"{file}:") for m in info.value.messages)
    return [m.removeprefix(str(file)) for m in info.value.messages]


# --------------------------------------------------------------------------- good files


def test_good_file_imports_to_the_default_map_and_round_trips(tmp_path):
    file = tmp_path / "Mapping.csv"
    file.write_text(csv_text(default_rows()))
    points = import_mapping(file)
    assert points == DEFAULT_MAP
    text = dump_register_map(points, source=str(file))
    assert text.startswith(f"# Register map imported from the legacy Mapping.csv {file}\n")
    out = tmp_path / "map.yaml"
    out.write_text(text)
    assert load_register_map(out) == points
    assert len([ln for ln in text.splitlines() if ln.startswith("  - {")]) == len(points)


def test_minimal_columns_defaults_and_spellings(tmp_path):
    """Only the required columns, lower-case header, ';' separators, a BOM, IEC type names,
    a blank line, inactive rows: the optional fields come from the defaults."""
    rows = default_rows()
    for row in rows:
        row["DataType"] = {"bool": "BOOL", "int16": "INT", "float32": "REAL"}[row["DataType"]]
        row.update(WordOrder="", Scale="", Link="", UnitId="")
    rows.append({**rows[0], "Id": "99", "IsActive": "0", "ModbusAddress": "junk"})
    lower = [c.lower() for c in COLUMNS]
    text = "\ufeff" + csv_text(rows, COLUMNS, ";", spelled=lower).replace("\n", "\n\n", 1)
    file = tmp_path / "Mapping.csv"
    file.write_text(text)
    points = import_mapping(file, default_link="rs485", default_unit=7)
    assert [p.name for p in points] == [p.name for p in DEFAULT_MAP]
    assert {(p.link, p.unit) for p in points} == {("rs485", 7)}
    assert {p.order.value for p in points} == {"ABCD"} and {p.scale for p in points} == {1.0}
    assert {p.eu for p in points} == {""}
    assert points[0].type.value == "int16" and points[4].type.value == "float32"


@pytest.mark.parametrize("description", [
    "yes", "no", "on", "0o17", "1e3", "0x1F", "true", "null", "~", "12", "1.5", ".inf",
    "a: b", "# not a comment", "'quoted'", "Zone 1 — 0.1 °C", "-", "[0]", "{x}", "",
])
def test_dumped_strings_read_back_as_strings(tmp_path, description):
    p = DEFAULT_MAP[0].model_copy(update={"description": description, "eu": description})
    points = (p, *DEFAULT_MAP[1:])
    out = tmp_path / "map.yaml"
    out.write_text(dump_register_map(points))
    assert load_register_map(out) == points


def test_dumped_numbers_read_back_exactly(tmp_path):
    p = DEFAULT_MAP[0].model_copy(update={"scale": 1e-5, "offset": -273.15})
    q = DEFAULT_MAP[1].model_copy(update={"scale": 12345678.9, "offset": 1.0})
    points = (p, q, *DEFAULT_MAP[2:])
    out = tmp_path / "map.yaml"
    out.write_text(dump_register_map(points))
    assert load_register_map(out) == points


# --------------------------------------------------------------------------- bad rows

B = "bool, int16, uint16, int32, uint32, float32 (or BOOL, INT, UINT, DINT, UDINT, REAL, bit, boolean, word, dword, float)"

# (point whose row is changed, {column: new cell}, [":<line>: <column>: <message>", ...])
BAD_ROWS = [
    ("temp_pump", {"Id": "x"}, ["Id: must be an integer (got 'x')"]),
    ("temp_pump", {"Id": "1"}, ["Id: already used on line 2 (got '1')"]),
    ("temp_pump", {"ModbusAddress": "4x"}, ["ModbusAddress: must be an integer (got '4x')"]),
    ("temp_pump", {"ModbusAddress": "70000"}, ["ModbusAddress: must be <= 65535 (got '70000')"]),
    ("grid_v_l1", {"ModbusAddress": "65535"},
     ["ModbusAddress: a float32 takes 2 registers: must be <= 65534 (got '65535')"]),
    ("temp_pump", {"IsReadOperation": "yes"}, ["IsReadOperation: must be 0 or 1 (got 'yes')"]),
    ("temp_pump", {"IsReadOperation": "0"},
     ["IsReadOperation: must be 1 for function code 4 (a read) (got '0')"]),
    ("heater_pump", {"IsReadOperation": "1"},
     ["IsReadOperation: must be 0 for function code 15 (a write) (got '1')"]),
    ("estop_ok", {"BitNumbers": "0;1"},
     ["BitNumbers: must be bit numbers separated by | (e.g. 0|1) (got '0;1')"]),
    ("estop_ok", {"BitNumbers": "0|16"}, ["BitNumbers: must be <= 15 (got '0|16')"]),
    ("estop_ok", {"BitNumbers": "1|1"}, ["BitNumbers: bit 1 is listed twice (got '1|1')"]),
    ("pedal", {"BitNumbers": "0"},
     ["BitNumbers: only for a bool packed in a register (functions 3, 4, 6, 16), not with "
      "function 2 (got '0')"]),
    ("temp_pump", {"FunctionCode": "7"},
     ["FunctionCode: must be one of 1, 2, 3, 4, 5, 6, 15, 16 (got '7')"]),
    ("temp_pump", {"FunctionCode": ""}, ["FunctionCode: must be an integer (got '')"]),
    ("temp_pump", {"FunctionCode": "6", "IsReadOperation": "0"},
     ["FunctionCode: temp_pump is an input of the PLC: must be a read function (1, 2, 3, 4) "
      "(got '6')"]),
    ("temp_pump", {"DataType": "int64"}, [f"DataType: must be one of {B} (got 'int64')"]),
    ("temp_pump", {"DataType": "bool", "Scale": ""},
     ["DataType: temp_pump is a float point: must be one of int16, uint16, int32, uint32, "
      "float32 (got 'bool')"]),
    ("pedal", {"DataType": "dint"},
     ["DataType: function 2 carries single bits: must be bool (got 'dint')"]),
    ("temp_pump", {"IsActive": "2"}, ["IsActive: must be 0 or 1 (got '2')"]),
    ("temp_pump", {"IsActive": "true"}, ["IsActive: must be 0 or 1 (got 'true')"]),
    ("temp_pump", {"UnitId": "0"}, ["UnitId: must be >= 1 (got '0')"]),
    ("temp_pump", {"UnitId": "one"}, ["UnitId: must be an integer (got 'one')"]),
    ("grid_v_l1", {"WordOrder": "ABDC"},
     ["WordOrder: must be one of ABCD, CDAB, BADC, DCBA (got 'ABDC')"]),
    ("temp_pump", {"Scale": "0"}, ["Scale: must not be 0 (got '0')"]),
    ("temp_pump", {"Scale": "abc"}, ["Scale: must be a finite number (got 'abc')"]),
    ("temp_pump", {"Offset": "nan"}, ["Offset: must be a finite number (got 'nan')"]),
    ("temp_pump", {"Link": "rs 485"}, []),                    # link names: checked by check-config
    ("heater_pump", {"ModbusAddress": "1"},
     [f"ModbusAddress: coil 1 of unit 3 on link io is already written by line "
      f"{LINE['heater_tank_wall']} (heater_tank_wall) (got '1')"]),
    ("pump", {"BitNumbers": "0"},
     [f"ModbusAddress: register 10 of unit 3 on link io is already written by line "
      f"{LINE['mixer']} (mixer) (both set bit 0) (got '10')"]),
]


@pytest.mark.parametrize("name, cells, expected", BAD_ROWS,
                         ids=[f"{n}-{'-'.join(c)}-{i}" for i, (n, c, _) in enumerate(BAD_ROWS)])
def test_bad_row_gives_file_line_column(tmp_path, name, cells, expected):
    rows = default_rows()
    rows[LINE[name] - 2].update(cells)
    if not expected:
        file = tmp_path / "Mapping.csv"
        file.write_text(csv_text(rows))
        assert len(import_mapping(file)) == len(rows)
        return
    assert errors(tmp_path, csv_text(rows)) == [f":{LINE[name]}: {e}" for e in expected]


def test_names_outside_the_contract_and_twice(tmp_path):
    rows = default_rows()
    rows[LINE["temp_pump"] - 2]["Name"] = "tmp_pump"
    rows[LINE["pedal"] - 2]["Name"] = "estop_ok"
    assert errors(tmp_path, csv_text(rows)) == [
        f":{LINE['temp_pump']}: Name: not a point of the PLC I/O contract (plc.contract); did you "
        "mean temp_pump? (got 'tmp_pump')",
        f":{LINE['pedal']}: Name: estop_ok is already mapped by line {LINE['estop_ok']}",
        ": Name: PLC point(s) not mapped: temp_pump, pedal (no active row names them)",
    ]


def test_every_problem_at_once_in_line_order(tmp_path):
    rows = default_rows()
    rows[LINE["mixer"] - 2].update(Id="m", DataType="word", BitNumbers="x")
    rows[LINE["temp_pump"] - 2].update(Scale="0", UnitId="300")
    rows[LINE["pedal"] - 2]["IsActive"] = "0"                  # unmapped now
    rows.insert(3, {"Id": "77", "Name": "short row"})
    text = csv_text(rows).replace("77,short row,,,,,,,,,,,,,\n", "77,short row\n")
    line = {n: (v if v < 5 else v + 1) for n, v in LINE.items()}   # the inserted row is line 5
    assert errors(tmp_path, text) == [
        f":{line['temp_pump']}: UnitId: must be <= 247 (got '300')",
        f":{line['temp_pump']}: Scale: must not be 0 (got '0')",
        ":5: row: has 2 fields, the header has 15",
        f":{line['mixer']}: Id: must be an integer (got 'm')",
        f":{line['mixer']}: BitNumbers: must be bit numbers separated by | (e.g. 0|1) (got 'x')",
        ": Name: PLC point(s) not mapped: pedal (no active row names them)",
    ]


@pytest.mark.parametrize("text, expected", [
    ("", [":1: header: missing: the first row names the columns " + ", ".join(COLUMNS)]),
    ("Id,Name\n1,temp_pump\n",
     [":1: header: missing column(s) ModbusAddress, IsReadOperation, BitNumbers, FunctionCode, "
      "DataType, Description, IsActive"]),
    (",".join([*COLUMNS, "Colour"]) + "\n",
     [":1: header: unknown column (known: " + ", ".join(HEADER) + ") (got 'Colour')"]),
    (",".join([*COLUMNS, "name"]) + "\n", [":1: header: column Name appears twice (got 'name')"]),
    (",".join(COLUMNS) + '\n1,"temp_pump\n', [":2: row: unexpected end of data"]),
    (",".join(COLUMNS) + '\n1,"temp"_pump\n', [":2: row: ',' expected after '\"'"]),
])
def test_bad_header_or_file(tmp_path, text, expected):
    assert errors(tmp_path, text) == expected


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        import_mapping(tmp_path / "nope.csv")
    assert info.value.messages == [f"{tmp_path / 'nope.csv'}: no such file"]
    (tmp_path / "latin1.csv").write_bytes(b"Id,Name\n1,\xe9\n")
    with pytest.raises(ConfigError) as info:
        import_mapping(tmp_path / "latin1.csv")
    assert info.value.messages == [f"{tmp_path / 'latin1.csv'}: not UTF-8 text (byte 10)"]


def test_default_unit_must_be_a_unit_id():
    with pytest.raises(ConfigError) as info:
        parse_mapping(csv_text(default_rows()), "M.csv", default_unit=0)
    assert info.value.messages == ["M.csv: the default unit id must be 1..247 (got 0)"]


def test_every_contract_point_must_be_mapped(tmp_path):
    assert errors(tmp_path, csv_text([])) == [
        ": Name: PLC point(s) not mapped: " + ", ".join([*INPUT_SPECS, *OUTPUT_SPECS])
        + " (no active row names them)"]


# --------------------------------------------------------------------------- the command


def tempering(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tempering"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_command_writes_the_map(tmp_path):
    (tmp_path / "Mapping.csv").write_text(csv_text(default_rows()))
    p = tempering("import-mapping", "Mapping.csv", "-o", "map.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"map.yaml: {len(DEFAULT_MAP)} points from Mapping.csv"
    assert load_register_map(tmp_path / "map.yaml") == DEFAULT_MAP
    assert sorted(f.name for f in tmp_path.iterdir()) == ["Mapping.csv", "map.yaml"]   # no temp left
    p = tempering("import-mapping", "Mapping.csv", cwd=tmp_path)                       # stdout
    assert p.returncode == 0 and p.stdout == (tmp_path / "map.yaml").read_text()


def test_command_options_fill_link_and_unit(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("Link", "UnitId")} for r in default_rows()]
    (tmp_path / "Mapping.csv").write_text(csv_text(rows, header=list(COLUMNS)))
    p = tempering("import-mapping", "Mapping.csv", "--link", "rs485", "--unit", "5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("link: rs485, unit: 5,") == len(DEFAULT_MAP)


def test_command_writes_nothing_on_error(tmp_path):
    rows = default_rows()
    rows[LINE["temp_pump"] - 2]["Scale"] = "0"
    rows[LINE["heater_pump"] - 2]["ModbusAddress"] = "1"
    (tmp_path / "Mapping.csv").write_text(csv_text(rows))
    (tmp_path / "old.yaml").write_text("previous content\n")
    for out in ("new.yaml", "old.yaml"):
        p = tempering("import-mapping", "Mapping.csv", "-o", out, cwd=tmp_path)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.splitlines() == [
            f"Mapping.csv:{LINE['temp_pump']}: Scale: must not be 0 (got '0')",
            f"Mapping.csv:{LINE['heater_pump']}: ModbusAddress: coil 1 of unit 3 on link io is "
            f"already written by line {LINE['heater_tank_wall']} (heater_tank_wall) (got '1')",
        ]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["Mapping.csv", "old.yaml"]
    assert (tmp_path / "old.yaml").read_text() == "previous content\n"
    p = tempering("import-mapping", "Mapping.csv", cwd=tmp_path)
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr


def test_command_reports_an_unwritable_output(tmp_path):
    (tmp_path / "Mapping.csv").write_text(csv_text(default_rows()))
    p = tempering("import-mapping", "Mapping.csv", "-o", "no/such/dir/map.yaml", cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.startswith("no/such/dir/map.yaml: cannot write: ")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["Mapping.csv"]
