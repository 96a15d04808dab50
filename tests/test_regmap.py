"""plc.modbus.codec (the value codec) and plc.modbus.regmap (request planning and
register-map validation).

Table-driven codec tests with hand-computed registers for every type and word order; the
planner on small maps and on the default map; every validation message, exact. Pure: no
sockets, no clock (register-map files are written under tmp_path).
"""

from __future__ import annotations

import copy
import math
import struct
from pathlib import Path

import pytest
import yaml

from plc.config import ConfigError
from plc.modbus import pdu
from plc.contract import INPUT_SPECS, OUTPUT_SPECS
from plc.modbus.codec import (
    Block,
    DataType,
    Table,
    WordOrder,
    apply_bits,
    decode_block,
    decode_registers,
    encode_block,
    encode_registers,
)
from plc.modbus.regmap import (
    LinkSettings,
    PointMap,
    check_map,
    load_register_map,
    plan_reads,
    plan_writes,
    poll_line_time_s,
)

ROOT = Path(__file__).resolve().parent.parent
MAP_FILE = ROOT / "config" / "register-map.yaml"
LINKS = {"io": LinkSettings()}


def point(name="temp_pump", function=4, address=0, **fields) -> PointMap:
    return PointMap(name=name, link=fields.pop("link", "io"), unit=fields.pop("unit", 1),
                    function=function, address=address, **fields)


@pytest.fixture(scope="module")
def default_map() -> tuple[PointMap, ...]:
    return load_register_map(MAP_FILE, LINKS)


# --------------------------------------------------------------------------- value codec

# (type, order, scale, offset, engineering value, registers) -- registers hand-computed
CODEC = [
    ("int16", "ABCD", 1, 0, 1234, (0x04D2,)),
    ("int16", "ABCD", 1, 0, -1, (0xFFFF,)),
    ("int16", "ABCD", 1, 0, -32768, (0x8000,)),
    ("int16", "CDAB", 1, 0, 1234, (0x04D2,)),            # one register: no word to swap
    ("int16", "BADC", 1, 0, 1234, (0xD204,)),
    ("int16", "DCBA", 1, 0, 1234, (0xD204,)),
    ("int16", "ABCD", 0.1, 0, -12.3, (0xFF85,)),          # -123 counts of 0.1 degC
    ("int16", "ABCD", 0.1, 0, 48.5, (0x01E5,)),           # 485
    ("uint16", "ABCD", 1, 0, 65535, (0xFFFF,)),
    ("uint16", "BADC", 1, 0, 0x1234, (0x3412,)),
    ("uint16", "ABCD", 0.01, -40, 20.0, (0x1770,)),       # raw 6000 = (20 + 40) / 0.01
    ("int32", "ABCD", 1, 0, 0x12345678, (0x1234, 0x5678)),
    ("int32", "CDAB", 1, 0, 0x12345678, (0x5678, 0x1234)),
    ("int32", "BADC", 1, 0, 0x12345678, (0x3412, 0x7856)),
    ("int32", "DCBA", 1, 0, 0x12345678, (0x7856, 0x3412)),
    ("int32", "ABCD", 1, 0, -2, (0xFFFF, 0xFFFE)),
    ("int32", "CDAB", 1, 0, -2, (0xFFFE, 0xFFFF)),
    ("int32", "BADC", 1, 0, -2, (0xFFFF, 0xFEFF)),
    ("int32", "DCBA", 1, 0, -2, (0xFEFF, 0xFFFF)),
    ("int32", "ABCD", 0.001, 0, -1.234, (0xFFFF, 0xFB2E)),   # raw -1234
    ("uint32", "ABCD", 1, 0, 4294967295, (0xFFFF, 0xFFFF)),
    ("uint32", "CDAB", 1, 0, 0x00010002, (0x0002, 0x0001)),
    ("uint32", "ABCD", 0.5, 10, 20.0, (0x0000, 0x0014)),      # raw 20 = (20 - 10) / 0.5
    ("float32", "ABCD", 1, 0, 230.0, (0x4366, 0x0000)),
    ("float32", "CDAB", 1, 0, 230.0, (0x0000, 0x4366)),
    ("float32", "BADC", 1, 0, 230.0, (0x6643, 0x0000)),
    ("float32", "DCBA", 1, 0, 230.0, (0x0000, 0x6643)),
    ("float32", "ABCD", 1, 0, -1.5, (0xBFC0, 0x0000)),
    ("float32", "CDAB", 1, 0, 50.0, (0x0000, 0x4248)),
    ("float32", "ABCD", 2, 1, 7.0, (0x4040, 0x0000)),         # raw 3.0
]


@pytest.mark.parametrize("type_, order, scale, offset, value, regs", CODEC,
                         ids=[f"{t}-{o}-{v}" for t, o, _, _, v, _ in CODEC])
def test_codec(type_, order, scale, offset, value, regs):
    p = point(type=type_, order=order, scale=scale, offset=offset)
    assert p.width == len(regs)
    assert encode_registers(p, value) == regs
    decoded = decode_registers(p, regs)
    assert isinstance(decoded, float)
    assert decoded == pytest.approx(value, abs=1e-9)


@pytest.mark.parametrize("type_, scale, value, regs", [
    ("int16", 1, 40000, (0x7FFF,)),              # clamped to the type's range
    ("int16", 1, -40000, (0x8000,)),
    ("int16", 1, math.inf, (0x7FFF,)),
    ("uint16", 1, -5, (0x0000,)),
    ("uint16", 0.1, 7000, (0xFFFF,)),             # raw 70000
    ("uint32", 1, -1, (0x0000, 0x0000)),
    ("int32", 1, 3e9, (0x7FFF, 0xFFFF)),
    ("int16", 0.1, 23.46, (235,)),                # raw 234.6 rounds to 235
    ("int16", 0.1, -23.46, (0x10000 - 235,)),
])
def test_encode_clamps_and_rounds(type_, scale, value, regs):
    assert encode_registers(point(type=type_, scale=scale), value) == regs


def test_float32_is_not_rounded_but_clamped():
    p = point(type="float32", scale=0.1)
    def raw(regs):
        return struct.unpack(">f", b"".join(r.to_bytes(2, "big") for r in regs))[0]

    assert raw(encode_registers(p, 0.123)) == pytest.approx(1.23, rel=1e-6)
    assert raw(encode_registers(p, 1e40)) == pytest.approx(3.4028234663852886e38)
    assert raw(encode_registers(p, -1e40)) == pytest.approx(-3.4028234663852886e38)
    assert math.isnan(decode_registers(p, encode_registers(p, math.nan)))


def test_nan_to_an_integer_type_is_refused():
    with pytest.raises(ValueError, match="temp_pump: cannot write NaN as int16"):
        encode_registers(point(type="int16"), math.nan)


@pytest.mark.parametrize("bits, regs, expected", [
    ((), (0,), False),
    ((), (5,), True),                            # a bool on a register: register != 0
    ((), (0x8000,), True),
    ((0, 1), (0b11,), True),                     # dual channel: both contacts closed
    ((0, 1), (0b01,), False),
    ((0, 1), (0b10,), False),
    ((0, 1), (0xFFFF,), True),
    ((15,), (0x8000,), True),
    ((15,), (0x7FFF,), False),
])
def test_decode_bool(bits, regs, expected):
    assert decode_registers(point("estop_ok", bits=bits), regs) is expected


@pytest.mark.parametrize("bits, value, regs", [
    ((), True, (1,)), ((), False, (0,)),
    ((2,), True, (0b100,)), ((2,), False, (0,)),
    ((0, 15), True, (0x8001,)),
])
def test_encode_bool(bits, value, regs):
    assert encode_registers(point("mixer", function=16, bits=bits), value) == regs


@pytest.mark.parametrize("word, bits, value, expected", [
    (0b1010, (0, 2), True, 0b1111),
    (0b1010, (0, 2), False, 0b1010 & ~0b0101),
    (0b1111, (1, 3), False, 0b0101),
    (0xFFFF, (15,), False, 0x7FFF),
    (0, (15,), True, 0x8000),
    (0b0110, (), True, 0b0110),                  # no bits: nothing to change
])
def test_apply_bits(word, bits, value, expected):
    assert apply_bits(point("mixer", function=16, bits=bits), word, value) == expected


def test_point_properties():
    p = point("heater_pump", function=15)
    assert (p.table, p.is_output, p.is_bit, p.width) == (Table.COILS, True, True, 1)
    p = point("temp_pump", function=4, type="float32")
    assert (p.table, p.is_output, p.is_bit, p.width) == (Table.INPUT, False, False, 2)
    assert point("mold_heater", function=6).table is Table.HOLDING
    assert point("pedal", function=2).table is Table.DISCRETE_INPUTS
    assert point().type is DataType.BOOL and point().order is WordOrder.ABCD


# --------------------------------------------------------------------------- planning


def reg(address, name="temp_pump", **kw):
    return point(name, function=kw.pop("function", 4), address=address, type=kw.pop("type", "int16"),
                 **kw)


def shape(blocks):
    return [(b.unit, b.function, b.address, b.count, len(b.points)) for b in blocks]


@pytest.mark.parametrize("addresses, settings, expected", [
    ([0, 1, 2], {}, [(0, 3)]),                                     # contiguous
    ([2, 0, 1], {}, [(0, 3)]),                                     # any order in the map
    ([0, 9], {}, [(0, 10)]),                                       # gap of 8 bridged
    ([0, 10], {}, [(0, 1), (10, 1)]),                              # gap of 9 not
    ([0, 2], {"max_gap_registers": 0}, [(0, 1), (2, 1)]),
    ([0, 1], {"max_gap_registers": 0}, [(0, 2)]),
    ([0, 0, 1], {}, [(0, 2)]),                                     # overlapping reads share
    ([0, 4, 8], {"max_read_registers": 5}, [(0, 5), (8, 1)]),
    ([0, 124], {"max_gap_registers": 124}, [(0, 125)]),            # the protocol limit
    ([0, 125], {"max_gap_registers": 124}, [(0, 1), (125, 1)]),
])
def test_read_coalescing(addresses, settings, expected):
    points = [reg(a) for a in addresses]
    blocks = plan_reads(points, LinkSettings(**settings))
    assert [(b.address, b.count) for b in blocks] == expected
    assert sum(len(b.points) for b in blocks) == len(points)


def test_a_32_bit_value_is_never_split():
    points = [reg(0, type="float32"), reg(2, type="float32"), reg(4, type="float32")]
    blocks = plan_reads(points, LinkSettings(max_read_registers=5))
    assert [(b.address, b.count) for b in blocks] == [(0, 4), (4, 2)]


def test_bit_reads_use_the_bit_limits():
    points = [point("pedal", 2, a) for a in (0, 33, 100)]
    assert [(b.address, b.count) for b in plan_reads(points, LinkSettings())] == [(0, 34), (100, 1)]
    assert [(b.address, b.count) for b in plan_reads(points, LinkSettings(max_gap_bits=99))] \
        == [(0, 101)]
    assert [(b.address, b.count) for b in
            plan_reads(points, LinkSettings(max_gap_bits=99, max_read_bits=50))] \
        == [(0, 34), (100, 1)]


def test_reads_are_grouped_by_link_unit_and_function():
    points = [reg(0), reg(1, unit=2), reg(2, function=3), reg(3, link="rtu"), reg(4)]
    blocks = plan_reads(points, {"io": LinkSettings(), "rtu": LinkSettings(max_gap_registers=0)})
    assert [(b.link, b.unit, b.function, b.address, b.count) for b in blocks] == [
        ("io", 1, 3, 2, 1), ("io", 1, 4, 0, 5), ("io", 2, 4, 1, 1), ("rtu", 1, 4, 3, 1)]


def test_naive_plan_is_one_block_per_point(default_map):
    inputs = [p for p in default_map if not p.is_output]
    naive = plan_reads(default_map, LinkSettings(), naive=True)
    assert len(naive) == len(inputs) == len(INPUT_SPECS)
    assert all(len(b.points) == 1 and b.count == b.points[0].width for b in naive)
    assert len(plan_reads(default_map, LinkSettings())) < len(naive)


def test_plans_keep_inputs_and_outputs_apart(default_map):
    assert all(not p.is_output for b in plan_reads(default_map, LinkSettings()) for p in b.points)
    assert all(p.is_output for b in plan_writes(default_map) for p in b.points)


@pytest.mark.parametrize("points, expected", [
    # coils: contiguous only, never across a gap
    ([("heater_pump", 15, 0), ("heater_fountain", 15, 1), ("mixer", 15, 2), ("pump", 15, 4)],
     [(15, 0, 3, 3), (15, 4, 1, 1)]),
    # registers with packed bits share their register's block
    ([("mixer", 16, 10, (0,)), ("pump", 16, 10, (1,)), ("vibration", 16, 11)],
     [(16, 10, 2, 3)]),
    ([("mixer", 16, 10), ("pump", 16, 12)], [(16, 10, 1, 1), (16, 12, 1, 1)]),
    # single writes: one per coil / register; packed bits in one register share it
    ([("mixer", 5, 0), ("pump", 5, 1)], [(5, 0, 1, 1), (5, 1, 1, 1)]),
    ([("mixer", 6, 3, (0,)), ("pump", 6, 3, (1,)), ("vibration", 6, 4)],
     [(6, 3, 1, 2), (6, 4, 1, 1)]),
])
def test_write_planning(points, expected):
    pts = [point(n, f, a, bits=rest[0] if rest else ()) for n, f, a, *rest in points]
    assert [(b.function, b.address, b.count, len(b.points)) for b in plan_writes(pts)] == expected


def test_write_blocks_respect_the_write_limits():
    regs = [point(f"r{a}", 16, a) for a in range(130)]
    assert [(b.address, b.count) for b in plan_writes(regs)] == [(0, 123), (123, 7)]
    coils = [point(f"c{a}", 15, a) for a in range(2000)]
    assert [(b.address, b.count) for b in plan_writes(coils)] == [(0, 1968), (1968, 32)]


def test_default_map_plans_to_four_reads_and_four_writes(default_map):
    reads = plan_reads(default_map, LINKS["io"])
    assert shape(reads) == [(1, 4, 0, 4, 4), (2, 4, 0, 20, 8), (3, 2, 0, 1, 1), (3, 4, 0, 1, 1)]
    writes = plan_writes(default_map)
    assert shape(writes) == [(3, 5, 8, 1, 1), (3, 6, 11, 1, 1), (3, 15, 0, 6, 6), (3, 16, 10, 1, 3)]
    for b in (*reads, *writes):
        assert b.link == "io" and b.end == b.address + b.count
        pdu.check_request(b.request(() if b.function < 5 else (0,) * b.count))


def test_block_request():
    b = Block("io", 3, 16, 10, 1, ())
    assert b.request((5,)) == pdu.Request(16, 10, 1, (5,))
    assert Block("io", 1, 4, 0, 20, ()).request() == pdu.Request(4, 0, 20)


def test_decode_the_default_blocks(default_map):
    temps, meter, pedal, estop = plan_reads(default_map, LINKS["io"])
    assert decode_block(temps, (485, 0xFF85, 315, 0)) == pytest.approx(
        {"temp_tank_bottom": 48.5, "temp_tank_wall": -12.3, "temp_pump": 31.5, "temp_fountain": 0.0})
    regs = [0] * 20
    regs[0:2] = (0x0000, 0x4366)          # 230.0 CDAB
    regs[8:10] = (0x0000, 0x4248)         # 50.0 CDAB
    regs[14:16] = (0x3FC0, 0x0000)        # 1.5 ABCD
    values = decode_block(meter, regs)
    assert values["grid_v_l1"] == 230.0 and values["grid_freq"] == 50.0
    assert values["current_mixer"] == 1.5 and values["grid_v_l2"] == 0.0
    assert set(values) == {p.name for p in meter.points}
    assert decode_block(pedal, (True,)) == {"pedal": True}
    assert decode_block(estop, (0b11,)) == {"estop_ok": True}
    assert decode_block(estop, (0b10,)) == {"estop_ok": False}
    with pytest.raises(ValueError, match="19 values for a block of 20"):
        decode_block(meter, regs[:19])


def test_encode_the_default_blocks(default_map):
    single_coil, single_reg, coils, motors = plan_writes(default_map)
    outputs = {name: False for name in OUTPUT_SPECS}
    outputs.update(heater_tank_wall=True, cool2_tank=True, mixer=True, vibration=True,
                   vib_heater=True, mold_heater=True)
    assert encode_block(coils, outputs) == (False, True, False, False, False, True)
    assert encode_block(motors, outputs) == (0b101,)          # mixer bit 0, vibration bit 2
    assert encode_block(single_coil, outputs) == (True,)
    assert encode_block(single_reg, outputs) == (1,)
    assert encode_block(motors, {**outputs, "mixer": False, "vibration": False}) == (0,)
    with pytest.raises(KeyError):
        encode_block(motors, {"mixer": True})


def test_encode_block_of_numbers():
    a, b = point("x", 16, 0, type="int32"), point("y", 16, 2, type="int16", scale=0.1)
    [block] = plan_writes([a, b])
    assert encode_block(block, {"x": -2, "y": 1.5}) == (0xFFFF, 0xFFFE, 15)


def test_poll_line_time(default_map):
    reads = plan_reads(default_map, LINKS["io"])
    t19200 = poll_line_time_s(reads, 19200, "even", 1)
    t115200 = poll_line_time_s(reads, 115200, "even", 1)
    t9600 = poll_line_time_s(reads, 9600, "even", 1)
    assert 0 < t115200 < t19200 < t9600
    assert t9600 == pytest.approx(2 * t19200)        # below 19200 everything scales with baud
    assert t19200 == pytest.approx(sum(pdu.rtu_transaction_s(b.request(), 19200, "even", 1)
                                       for b in reads))
    naive = plan_reads(default_map, LINKS["io"], naive=True)
    assert poll_line_time_s(naive, 19200, "even", 1) > t19200
    assert poll_line_time_s(plan_writes(default_map), 19200, "even", 1) > 0


# --------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def map_data() -> dict:
    return yaml.safe_load(MAP_FILE.read_text())


def index_of(data: dict, name: str) -> int:
    return next(i for i, p in enumerate(data["points"]) if p["name"] == name)


def map_errors(tmp_path: Path, data: dict | str, links=LINKS) -> list[str]:
    file = tmp_path / "map.yaml"
    file.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_register_map(file, links)
    assert info.value.path == file
    assert all(m.startswith(f"{file}: ") for m in info.value.messages)
    return [m.removeprefix(f"{file}: ") for m in info.value.messages]


def patch_points(data: dict, patches: dict[str, dict]) -> dict:
    """Copy of the map with ``{point name: {field: value or None to delete}}`` applied."""
    data = copy.deepcopy(data)
    for name, fields in patches.items():
        entry = data["points"][index_of(data, name)]
        for key, value in fields.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
    return data


def test_default_map_is_valid(default_map):
    assert {p.name for p in default_map} == set(INPUT_SPECS) | set(OUTPUT_SPECS)
    assert check_map(default_map, LINKS) == []
    assert load_register_map(MAP_FILE) == default_map        # links unchecked: same points


IDX = {name: i for i, name in enumerate(p["name"] for p in yaml.safe_load(MAP_FILE.read_text())["points"])}


def at(name: str, field: str) -> str:
    return f"points[{IDX[name]}] ({name}).{field}"


VALIDATION_CASES = [
    # the link
    ({"temp_pump": {"link": "io2"}},
     [f"{at('temp_pump', 'link')}: no such link in fieldbus.links (have io) (got 'io2')"]),
    # the I/O contract
    ({"temp_pump": {"name": "tmp_pump"}},
     ["points[2] (tmp_pump).name: not a point of the PLC I/O contract (plc.contract); did you mean "
      "temp_pump? (got 'tmp_pump')",
      "points: PLC point(s) not mapped: temp_pump"]),
    ({"temp_pump": {"name": "temp_tank_bottom"}},
     ["points[2] (temp_tank_bottom).name: temp_tank_bottom is already mapped by points[0]",
      "points: PLC point(s) not mapped: temp_pump"]),
    ({"temp_pump": {"function": 3}}, []),                      # a holding register is fine too
    ({"temp_pump": {"function": 6}},
     [f"{at('temp_pump', 'function')}: temp_pump is an input of the PLC: must be a read "
      "function (1, 2, 3, 4) (got 6)"]),
    ({"heater_pump": {"function": 1}},
     [f"{at('heater_pump', 'function')}: heater_pump is an output of the PLC: must be a write "
      "function (5, 6, 15, 16) (got 1)"]),
    ({"estop_ok": {"type": "uint16", "bits": None}},
     [f"{at('estop_ok', 'type')}: estop_ok is a bool point: must be bool (got 'uint16')"]),
    ({"temp_pump": {"type": None}},
     [f"{at('temp_pump', 'type')}: temp_pump is a float point: must be one of int16, uint16, "
      "int32, uint32, float32 (got 'bool')"]),
    # bits
    ({"estop_ok": {"bits": None}}, []),                        # a bool on a register: != 0
    ({"pedal": {"bits": [0]}},
     [f"{at('pedal', 'bits')}: only for a bool packed in a register (functions 3, 4, 6, 16), "
      "not with function 2 (got [0])"]),
    ({"current_vibration": {"bits": [1]}},
     [f"{at('current_vibration', 'bits')}: only for type bool, not with type float32 (got [1])"]),
    ({"estop_ok": {"bits": [0, 16]}}, [f"{at('estop_ok', 'bits')}[1]: must be <= 15 (got 16)"]),
    ({"estop_ok": {"bits": [-1]}}, [f"{at('estop_ok', 'bits')}[0]: must be >= 0 (got -1)"]),
    ({"estop_ok": {"bits": [1, 1]}}, [f"{at('estop_ok', 'bits')}: bit 1 is listed twice (got [1, 1])"]),
    ({"estop_ok": {"bits": "0|1"}}, [f"{at('estop_ok', 'bits')}: must be a list (got '0|1')"]),
    # types and functions
    ({"pedal": {"type": "int32"}},
     [f"{at('pedal', 'type')}: function 2 carries single bits: must be bool (got 'int32')"]),
    ({"temp_pump": {"type": "int64"}},
     [f"{at('temp_pump', 'type')}: must be one of bool, int16, uint16, int32, uint32, float32 "
      "(got 'int64')"]),
    ({"grid_v_l1": {"order": "ABDC"}},
     [f"{at('grid_v_l1', 'order')}: must be one of ABCD, CDAB, BADC, DCBA (got 'ABDC')"]),
    ({"temp_pump": {"function": 7}},
     [f"{at('temp_pump', 'function')}: must be one of 1, 2, 3, 4, 5, 6, 15, 16 (got 7)"]),
    ({"temp_pump": {"function": "4"}}, [f"{at('temp_pump', 'function')}: must be an integer (got '4')"]),
    ({"temp_pump": {"function": 4.0}}, [f"{at('temp_pump', 'function')}: must be an integer (got 4.0)"]),
    # addresses and units
    ({"grid_v_l1": {"address": 65535}},
     [f"{at('grid_v_l1', 'address')}: a float32 takes 2 registers: must be <= 65534 (got 65535)"]),
    ({"temp_pump": {"address": 65535}}, []),
    ({"temp_pump": {"address": 65536}}, [f"{at('temp_pump', 'address')}: must be <= 65535 (got 65536)"]),
    ({"temp_pump": {"address": -1}}, [f"{at('temp_pump', 'address')}: must be >= 0 (got -1)"]),
    ({"temp_pump": {"unit": 0}}, [f"{at('temp_pump', 'unit')}: must be >= 1 (got 0)"]),
    ({"temp_pump": {"unit": 248}}, [f"{at('temp_pump', 'unit')}: must be <= 247 (got 248)"]),
    ({"temp_pump": {"unit": True}}, [f"{at('temp_pump', 'unit')}: must be an integer (got true)"]),
    # scale
    ({"temp_pump": {"scale": 0}}, [f"{at('temp_pump', 'scale')}: must not be 0 (got 0.0)"]),
    ({"temp_pump": {"scale": "0.1"}}, [f"{at('temp_pump', 'scale')}: must be a number (got '0.1')"]),
    # overlapping writes (overlapping reads are allowed)
    ({"temp_pump": {"address": 0}}, []),
    ({"heater_pump": {"address": 1}},
     [f"{at('heater_pump', 'address')}: coil 1 of unit 3 on link io is already written by "
      f"points[{IDX['heater_tank_wall']}] (heater_tank_wall) (got 1)"]),
    ({"vib_heater": {"address": 0}},                           # fc 5 and fc 15: the same coils
     [f"{at('vib_heater', 'address')}: coil 0 of unit 3 on link io is already written by "
      f"points[{IDX['heater_tank_bottom']}] (heater_tank_bottom) (got 0)"]),
    ({"heater_pump": {"unit": 4, "address": 1}}, []),          # another unit
    ({"mold_heater": {"address": 10}},
     [f"{at('mold_heater', 'address')}: register 10 of unit 3 on link io is already written by "
      f"points[{IDX['mixer']}] (mixer) (got 10)"]),
    ({"pump": {"bits": [0]}},
     [f"{at('pump', 'address')}: register 10 of unit 3 on link io is already written by "
      f"points[{IDX['mixer']}] (mixer) (both set bit 0) (got 10)"]),
    ({"mold_heater": {"address": 10, "bits": [5]}},
     [f"{at('mold_heater', 'address')}: register 10 of unit 3 on link io is already written by "
      f"points[{IDX['mixer']}] (mixer) (with function 16; packed bits share one function) "
      "(got 10)"]),
    ({"mold_heater": {"address": 10, "bits": [5], "function": 16}}, []),
    # fields
    ({"temp_pump": {"adress": 2, "address": None}},
     [f"{at('temp_pump', 'address')}: missing field", f"{at('temp_pump', 'adress')}: unknown field"]),
    ({"temp_pump": {"name": None}},
     ["points[2].name: missing field", "points: PLC point(s) not mapped: temp_pump"]),
    ({"temp_pump": {"eu": 5}}, [f"{at('temp_pump', 'eu')}: must be a string (got 5)"]),
]


@pytest.mark.parametrize("patches, expected", VALIDATION_CASES,
                         ids=[f"{next(iter(p))}-{'-'.join(next(iter(p.values())))}-{i}"
                              for i, (p, _) in enumerate(VALIDATION_CASES)])
def test_validation_message(tmp_path, map_data, patches, expected):
    data = patch_points(map_data, patches)
    if expected:
        assert map_errors(tmp_path, data) == expected
    else:                                          # allowed: the map loads
        assert len(load_register_map(_write(tmp_path, data), LINKS)) == len(data["points"])


def _write(tmp_path: Path, data: dict) -> Path:
    file = tmp_path / "ok.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    return file


def test_a_missing_point(tmp_path, map_data):
    data = copy.deepcopy(map_data)
    del data["points"][index_of(data, "pedal")]
    del data["points"][index_of(data, "mixer")]
    assert map_errors(tmp_path, data) == ["points: PLC point(s) not mapped: pedal, mixer"]


def test_every_problem_at_once_in_file_order(tmp_path, map_data):
    data = patch_points(map_data, {
        "temp_pump": {"link": "io2"},
        "grid_v_l1": {"scale": 0, "unit": 0},
        "heater_pump": {"address": 1},
        "estop_ok": {"bits": [3, 3]},
    })
    del data["points"][index_of(data, "pedal")]
    assert map_errors(tmp_path, data) == [
        f"{at('temp_pump', 'link')}: no such link in fieldbus.links (have io) (got 'io2')",
        f"{at('grid_v_l1', 'unit')}: must be >= 1 (got 0)",
        f"{at('grid_v_l1', 'scale')}: must not be 0 (got 0.0)",
        f"{at('estop_ok', 'bits')}: bit 3 is listed twice (got [3, 3])",
        # pedal was removed: the points after it moved up by one
        f"points[{IDX['heater_pump'] - 1}] (heater_pump).address: coil 1 of unit 3 on link io is "
        f"already written by points[{IDX['heater_tank_wall'] - 1}] (heater_tank_wall) (got 1)",
        "points: PLC point(s) not mapped: pedal",
    ]


def test_links_are_checked_only_when_given(tmp_path, map_data):
    data = patch_points(map_data, {"temp_pump": {"link": "rtu"}})
    file = _write(tmp_path, data)
    assert len(load_register_map(file)) == len(map_data["points"])
    assert map_errors(tmp_path, data, links={})[0].endswith(
        "no such link in fieldbus.links (have none) (got 'io')")


@pytest.mark.parametrize("text, expected", [
    ("points: []\n", ["points: PLC point(s) not mapped: " + ", ".join([*INPUT_SPECS, *OUTPUT_SPECS])]),
    ("points: 3\n", ["points: must be a list (got 3)"]),
    ("points:\n  - 3\n", ["points[0]: must be a mapping (got 3)",
                          "points: PLC point(s) not mapped: " + ", ".join([*INPUT_SPECS, *OUTPUT_SPECS])]),
    ("pionts: []\n", ["points: missing field", "pionts: unknown field"]),
    ("- a\n", None),
])
def test_map_file_shape(tmp_path, text, expected):
    file = tmp_path / "map.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_register_map(file)
    if expected is None:
        assert info.value.messages == [f"{file}: top level must be a mapping of sections (got a list)"]
    else:
        assert [m.removeprefix(f"{file}: ") for m in info.value.messages] == expected


def test_models_are_frozen(default_map):
    with pytest.raises(Exception):
        default_map[0].address = 5
