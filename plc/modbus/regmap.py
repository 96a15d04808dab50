"""The register map: which Modbus register or bit carries which PLC point, and how.

One job: describe, validate and plan. No I/O: the links (``plc.modbus.link``) and the twin's
slave (``twin.modbus_slave``) both use this module, so the two ends of the wire agree by
construction and an independent client (mbpoll) checks the pair in the tests. How a value is
coded into registers (types, word orders, scale / offset, packed bits) is the pure codec,
``plc.modbus.codec``; this module holds the pydantic models of the map and its checks.

Semantics of the legacy ``Mapping.csv``, one entry per point:
- ``link``: name of a link in ``fieldbus.links`` (a TCP endpoint or a serial port).
- ``unit``: Modbus unit id (slave address) 1..247.
- ``function``: 1 coils, 2 discrete inputs, 3 holding registers, 4 input registers (inputs);
  5 single coil, 6 single register, 15 multiple coils, 16 multiple registers (outputs).
- ``address``: 0-based protocol address (register or bit) 0..65535.
- ``bits``: bit numbers 0..15 inside a 16-bit register, for a bool packed into a register
  (functions 3, 4, 6, 16). An input is true when every listed bit is set (a dual-channel
  contact gives two bits); an output sets or clears every listed bit. A bool on a register
  without ``bits`` reads true when the register is not 0 and is written as 1 / 0.
- ``type``: bool, int16, uint16, int32, uint32, float32 (32-bit types use two registers).
  Bit functions (1, 2, 5, 15) carry bools only.
- ``order``: word and byte order of multi-byte values: ABCD (big-endian, Modbus default),
  CDAB (word swap), BADC (byte swap), DCBA (both). On a 16-bit type ABCD = CDAB (AB) and
  BADC = DCBA (BA).
- ``scale``, ``offset``: engineering value = raw * scale + offset (scale never 0).
- ``eu``: engineering unit (degC, A, V, Hz, %...).

Validation, every problem at once, each naming the point and the field
(``<file>: points[3] (temp_pump).bits: ...``):
- per point (``PointMap``): field types and ranges; ``bits`` only with functions 3/4/6/16 and
  type bool, no bit twice; a bit function carries a bool; ``address`` + width <= 65536;
  ``scale`` != 0.
- the map as a whole (``check_map``): the link exists; the name is a point of the PLC I/O
  contract (``plc.contract.INPUT_SPECS`` / ``OUTPUT_SPECS``), mapped once, every contract point
  mapped; an input is read (1-4) and an output written (5, 6, 15, 16); a bool point has type
  bool, a float point a number type; no coil or register written by two points (two bools
  packed into one register with disjoint bits and the same function share it). Overlapping
  reads are allowed.

Request planning (Modbus Application Protocol V1.1b3 quantity limits): reads of one link, unit
and function are coalesced into the fewest blocks of at most ``max_read_registers`` registers
(≤ 125) or ``max_read_bits`` bits (≤ 2000), bridging gaps of at most ``max_gap_registers`` /
``max_gap_bits`` unused addresses. Writes with 15/16 are coalesced only over contiguous
addresses (a gap would overwrite what is not ours; at most 1968 bits / 123 registers); 5/6
write one coil or register each (bools packed into one register share its write).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence

from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from ..configbase import (
    _NOTHING,
    Int,
    Number,
    Problem,
    Slug,
    Text,
    _exact_int,
    _Frozen,
    _problems,
    _raise_if,
    _read_mapping,
    _validate,
)
from ..contract import INPUT_SPECS, OUTPUT_SPECS
from ..image import PointType
from . import pdu
from .codec import TABLE_OF_FUNCTION, WIDE_TYPES, Block, DataType, Table, WordOrder

__all__ = [
    "DeviceSettings", "FieldbusSettings", "LinkConfig", "LinkSettings", "PointMap",
    "RegisterMap", "RtuLink", "TcpLink", "check_map", "load_register_map", "plan_reads",
    "plan_writes", "poll_line_time_s",
]


_NUMBER_TYPES = ", ".join(t.value for t in DataType if t is not DataType.BOOL)
_INTEGER_TYPES = ", ".join(t.value for t in DataType if t not in (DataType.BOOL, DataType.FLOAT32))
_PACKED_FUNCTIONS = frozenset({3, 4, 6, 16})   # register functions: a bool may be packed in bits

Function = Annotated[Literal[1, 2, 3, 4, 5, 6, 15, 16], BeforeValidator(_exact_int)]
UnitId = Annotated[Int, Field(ge=1, le=247)]


# --------------------------------------------------------------------------- the points


class PointMap(_Frozen):
    """One row of the register map: where a PLC point lives and how its value is coded."""

    name: Text                                   # a point of the PLC I/O contract
    link: Text                                   # key of FieldbusSettings.links
    unit: UnitId
    function: Function
    address: Annotated[Int, Field(ge=0, le=0xFFFF)]   # 0-based protocol address
    bits: tuple[Annotated[Int, Field(ge=0, le=15)], ...] = ()
    type: DataType = DataType.BOOL
    order: WordOrder = WordOrder.ABCD
    scale: Number = 1.0                          # engineering = raw * scale + offset
    offset: Number = 0.0
    eu: Annotated[str, Field(strict=True)] = ""  # engineering unit
    description: Annotated[str, Field(strict=True)] = ""

    @property
    def table(self) -> Table:
        return TABLE_OF_FUNCTION[self.function]

    @property
    def is_output(self) -> bool:
        return self.function in pdu.WRITE_FUNCTIONS

    @property
    def is_bit(self) -> bool:
        return self.function in pdu.BIT_FUNCTIONS

    @property
    def width(self) -> int:
        """Registers the value occupies (2 for 32-bit types), or 1 bit."""
        return 2 if self.type in WIDE_TYPES and not self.is_bit else 1

    @model_validator(mode="after")
    def _consistent(self) -> PointMap:
        problems: list[Problem] = []
        bits = list(self.bits)
        if self.bits and self.function not in _PACKED_FUNCTIONS:
            problems.append((("bits",), "only for a bool packed in a register (functions 3, 4, "
                             f"6, 16), not with function {self.function}", bits))
        if self.bits and self.type is not DataType.BOOL:
            problems.append((("bits",), f"only for type bool, not with type {self.type.value}",
                             bits))
        if self.is_bit and self.type is not DataType.BOOL:
            problems.append((("type",), f"function {self.function} carries single bits: must "
                             "be bool", self.type.value))
        if self.address + self.width > 0x10000:
            problems.append((("address",), f"a {self.type.value} takes {self.width} registers: "
                             f"must be <= {0x10000 - self.width}", self.address))
        _raise_if(problems)
        return self

    # checks of one field run even when another field is bad (unlike the cross-field ones)
    @field_validator("bits")
    @classmethod
    def _bits_once(cls, bits: tuple[int, ...]) -> tuple[int, ...]:
        _raise_if([((), f"bit {b} is listed twice", list(bits))
                   for b in sorted({b for b in bits if bits.count(b) > 1})])
        return bits

    @field_validator("scale")
    @classmethod
    def _scale_not_zero(cls, scale: float) -> float:
        _raise_if([((), "must not be 0", scale)] if scale == 0 else [])
        return scale


def _name_hint(name: str) -> str:
    close = difflib.get_close_matches(name, [*INPUT_SPECS, *OUTPUT_SPECS], n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _check_map(indexed: Sequence[tuple[int, PointMap]], links: Mapping[str, Any] | None,
               excused: frozenset[str] | set[str] = frozenset(),
               ref: Callable[[int], str] = lambda i: f"points[{i}]") -> list[Problem]:
    """Problems of the map as a whole; ``indexed`` pairs each valid point with its index in
    the file (invalid ones are left out); contract points in ``excused`` (the names of the
    invalid ones) are not reported as unmapped; ``ref`` names another point in a message.
    Locations are ``(index, field)``, or ``()`` for the map."""
    problems: list[Problem] = []
    first: dict[str, int] = {}
    coils: dict[tuple, tuple[int, PointMap]] = {}
    registers: dict[tuple, list[tuple[int, PointMap]]] = {}
    for i, p in indexed:
        if links is not None and p.link not in links:
            problems.append(((i, "link"), f"no such link in fieldbus.links (have "
                             f"{', '.join(links) or 'none'})", p.link))
        spec = INPUT_SPECS.get(p.name) or OUTPUT_SPECS.get(p.name)
        if spec is None:
            problems.append(((i, "name"), "not a point of the PLC I/O contract (plc.contract)"
                             + _name_hint(p.name), p.name))
        elif p.name in first:
            j = first[p.name]
            problems.append(((i, "name"), f"{p.name} is already mapped by {ref(j)}",
                             _NOTHING))
        else:
            first[p.name] = i
        if spec is not None:
            if p.name in INPUT_SPECS and p.is_output:
                problems.append(((i, "function"), f"{p.name} is an input of the PLC: must be "
                                 "a read function (1, 2, 3, 4)", p.function))
            if p.name in OUTPUT_SPECS and not p.is_output:
                problems.append(((i, "function"), f"{p.name} is an output of the PLC: must be "
                                 "a write function (5, 6, 15, 16)", p.function))
            if spec.type is PointType.BOOL and p.type is not DataType.BOOL:
                problems.append(((i, "type"), f"{p.name} is a bool point: must be bool",
                                 p.type.value))
            elif spec.type is PointType.FLOAT and p.type is DataType.BOOL:
                problems.append(((i, "type"), f"{p.name} is a float point: must be one of "
                                 f"{_NUMBER_TYPES}", p.type.value))
            elif spec.type is PointType.INT and p.type in (DataType.BOOL, DataType.FLOAT32):
                problems.append(((i, "type"), f"{p.name} is an int point: must be one of "
                                 f"{_INTEGER_TYPES}", p.type.value))
        if not p.is_output:
            continue
        where = f"of unit {p.unit} on link {p.link}"
        if p.table is Table.COILS:
            key = (p.link, p.unit, p.address)
            if key in coils:
                j, q = coils[key]
                problems.append(((i, "address"), f"coil {p.address} {where} is already written "
                                 f"by {ref(j)} ({q.name})", p.address))
            else:
                coils[key] = (i, p)
            continue
        for address in range(p.address, p.address + p.width):
            sharing = registers.setdefault((p.link, p.unit, address), [])
            for j, q in sharing:
                if p.bits and q.bits and not set(p.bits) & set(q.bits) \
                        and p.function == q.function:
                    continue           # bools packed into one register, disjoint bits
                why = ""
                if p.bits and q.bits and set(p.bits) & set(q.bits):
                    why = f" (both set bit {min(set(p.bits) & set(q.bits))})"
                elif p.bits and q.bits:
                    why = f" (with function {q.function}; packed bits share one function)"
                problems.append(((i, "address"), f"register {address} {where} is already "
                                 f"written by {ref(j)} ({q.name}){why}", p.address))
                break
            sharing.append((i, p))
    missing = [n for n in (*INPUT_SPECS, *OUTPUT_SPECS) if n not in first and n not in excused]
    if missing:
        problems.append(((), f"PLC point(s) not mapped: {', '.join(missing)}", _NOTHING))
    return problems


def check_map(points: Sequence[PointMap], links: Mapping[str, Any] | None = None) -> list[Problem]:
    """Problems of a whole map of valid points (see the module docstring), as
    ``(location, message, got)`` with location ``(index, field)`` or ``()`` for the map;
    ``links`` (names of ``fieldbus.links``) is checked when given. Empty when all is well."""
    return _check_map(list(enumerate(points)), links)


def _validated_points(value: Any, handler: ValidatorFunctionWrapHandler,
                      links: Mapping[str, Any] | None) -> tuple[PointMap, ...]:
    """Validate the list of points, then the map as a whole over the points that are valid:
    every problem of the list at once, each at ``[index].field``."""
    try:
        points = handler(value)
    except ValidationError as exc:
        problems = _problems(exc)
        if not isinstance(value, (list, tuple)) or \
                any(not loc or not isinstance(loc[0], int) for loc, _, _ in problems):
            raise                      # not a list at all: nothing more to say per point
        bad = {loc[0] for loc, _, _ in problems}
        excused = {v["name"] for i, v in enumerate(value) if i in bad and isinstance(v, dict)
                   and isinstance(v.get("name"), str)}
        valid = [(i, PointMap.model_validate(v)) for i, v in enumerate(value) if i not in bad]
        _raise_if(_in_order(problems + _check_map(valid, links, excused)))
        raise                          # not reached: problems is never empty here
    _raise_if(_in_order(check_map(points, links)))
    return points


def _in_order(problems: list[Problem]) -> list[Problem]:
    """Problems point by point in file order, those of the whole map last."""
    return sorted(problems, key=lambda item: item[0][0] if item[0] else math.inf)


# --------------------------------------------------------------------------- links


class DeviceSettings(_Frozen):
    """Per-unit overrides of a link's settings (``devices: {2: {timeout_ms: 500}}``)."""

    timeout_ms: Annotated[Int, Field(ge=1, le=60000)] | None = None
    retries: Annotated[Int, Field(ge=0, le=10)] | None = None


class LinkSettings(_Frozen):
    """What both transports share: timing, retries, request planning, demotion (ms)."""

    timeout_ms: Annotated[Int, Field(ge=1, le=60000)] = 250         # per request
    retries: Annotated[Int, Field(ge=0, le=10)] = 1                 # extra attempts after a timeout
    poll_ms: Annotated[Int, Field(ge=1, le=60000)] = 50             # every block at most this often
    refresh_ms: Annotated[Int, Field(ge=1, le=3600000)] = 1000      # outputs rewritten at least this often
    reconnect_max_ms: Annotated[Int, Field(ge=100, le=600000)] = 2000   # backoff cap (100 ms, doubling)
    max_gap_registers: Annotated[Int, Field(ge=0, le=124)] = 8      # unused registers a read may bridge
    max_gap_bits: Annotated[Int, Field(ge=0, le=1999)] = 32
    max_read_registers: Annotated[Int, Field(ge=1, le=pdu.MAX_READ_REGISTERS)] = 125
    max_read_bits: Annotated[Int, Field(ge=1, le=pdu.MAX_READ_BITS)] = 2000
    demote_after: Annotated[Int, Field(ge=1, le=1000)] = 3          # failed polls before demotion
    demoted_poll_ms: Annotated[Int, Field(ge=1, le=600000)] = 2000  # a demoted unit is tried this often
    devices: dict[UnitId, DeviceSettings] = {}

    def timeout_s(self, unit: int) -> float:
        """Reply timeout of ``unit`` in seconds (its override, else the link's)."""
        device = self.devices.get(unit)
        ms = device.timeout_ms if device and device.timeout_ms is not None else self.timeout_ms
        return ms / 1000.0

    def retries_for(self, unit: int) -> int:
        """Extra attempts after a timeout for ``unit`` (its override, else the link's)."""
        device = self.devices.get(unit)
        return device.retries if device and device.retries is not None else self.retries


class TcpLink(LinkSettings):
    """Modbus TCP: one connection to ``host:port`` (a device or a gateway)."""

    transport: Literal["tcp"]
    host: Text
    port: Annotated[Int, Field(ge=1, le=65535)]


class RtuLink(LinkSettings):
    """Modbus RTU on a serial line: one request at a time on ``device``."""

    transport: Literal["rtu"]
    device: Text
    baud_rate: Annotated[Int, Field(gt=0)] = 19200
    parity: Literal["none", "even", "odd"] = "even"
    stop_bits: Annotated[Literal[1, 2], BeforeValidator(_exact_int)] = 1


LinkConfig = Annotated[TcpLink | RtuLink, Field(discriminator="transport")]


class FieldbusSettings(_Frozen):
    """The machine file's optional ``fieldbus:`` section: the links and the register map,
    given as ``map_file`` (a register-map file relative to the machine file, loaded by
    ``plc.config.load_all``, which fills in ``points``) or inline as ``points``."""

    links: Annotated[dict[Slug, LinkConfig], Field(min_length=1)]
    map_file: Text | None = None
    points: tuple[PointMap, ...] = ()
    stale_after_ms: Annotated[Int, Field(ge=1, le=3600000)] = 1000   # older values read UNCERTAIN

    @field_validator("points", mode="wrap")
    @classmethod
    def _map(cls, value: Any, handler: ValidatorFunctionWrapHandler,
             info: ValidationInfo) -> tuple[PointMap, ...]:
        return _validated_points(value, handler, info.data.get("links"))

    @model_validator(mode="after")
    def _one_source(self) -> FieldbusSettings:
        if self.map_file is not None and self.points:
            _raise_if([((), "give either map_file or points, not both", _NOTHING)])
        if self.map_file is None and not self.points:
            _raise_if([((), "give the register map: map_file (a file relative to the machine "
                         "file) or points", _NOTHING)])
        return self


class RegisterMap(_Frozen):
    """A register-map file: ``points:``, a list of PointMap. The link names are checked when
    the validation context carries ``links`` (``load_register_map(path, links)``)."""

    points: tuple[PointMap, ...]           # empty: every PLC point is reported unmapped

    @field_validator("points", mode="wrap")
    @classmethod
    def _map(cls, value: Any, handler: ValidatorFunctionWrapHandler,
             info: ValidationInfo) -> tuple[PointMap, ...]:
        return _validated_points(value, handler, (info.context or {}).get("links"))


def load_register_map(path: str | Path,
                      links: Mapping[str, Any] | None = None) -> tuple[PointMap, ...]:
    """The points of a register-map file, validated as a whole (against ``links`` when
    given). Raises ConfigError with every problem, each ``<file>: points[i] (name).field``."""
    return _validate(path, _read_mapping(path), RegisterMap, context={"links": links}).points


# --------------------------------------------------------------------------- request planning


def _groups(points: Sequence[PointMap]) -> dict[tuple[str, int, int], list[PointMap]]:
    groups: dict[tuple[str, int, int], list[PointMap]] = {}
    for p in sorted(points, key=lambda p: (p.link, p.unit, p.function, p.address, p.name)):
        groups.setdefault((p.link, p.unit, p.function), []).append(p)
    return groups


def _coalesce(key: tuple[str, int, int], points: list[PointMap], max_gap: int,
              max_count: int) -> list[Block]:
    """Blocks over ``points`` (sorted by address): a point joins the current block when at
    most ``max_gap`` unused addresses lie between them and the block stays within
    ``max_count``."""
    blocks: list[Block] = []
    start = end = 0
    members: list[PointMap] = []
    for p in points:
        p_end = p.address + p.width
        if members and p.address - end <= max_gap and max(end, p_end) - start <= max_count:
            end = max(end, p_end)
            members.append(p)
            continue
        if members:
            blocks.append(Block(*key, start, end - start, tuple(members)))
        start, end, members = p.address, p_end, [p]
    if members:
        blocks.append(Block(*key, start, end - start, tuple(members)))
    return blocks


def plan_reads(points: Sequence[PointMap], settings: LinkSettings | Mapping[str, LinkSettings],
               naive: bool = False) -> tuple[Block, ...]:
    """The read blocks of the input points (functions 1-4), per (link, unit, function) in
    address order, coalesced within ``settings``' gaps and limits (``settings`` may also map
    link names to their settings). ``naive``: one block per point (for comparison)."""
    blocks: list[Block] = []
    for key, group in _groups([p for p in points if not p.is_output]).items():
        if naive:
            blocks += [Block(*key, p.address, p.width, (p,)) for p in group]
            continue
        s = settings if isinstance(settings, LinkSettings) else settings[key[0]]
        bit = key[2] in pdu.BIT_FUNCTIONS
        blocks += _coalesce(key, group, s.max_gap_bits if bit else s.max_gap_registers,
                            s.max_read_bits if bit else s.max_read_registers)
    return tuple(blocks)


def plan_writes(points: Sequence[PointMap]) -> tuple[Block, ...]:
    """The write blocks of the output points (functions 5, 6, 15, 16): 15/16 coalesced over
    contiguous addresses only (up to 1968 bits / 123 registers); 5/6 one block per coil or
    register. Bools packed into one register always share its block."""
    blocks: list[Block] = []
    for key, group in _groups([p for p in points if p.is_output]).items():
        function = key[2]
        limit = {15: pdu.MAX_WRITE_BITS, 16: pdu.MAX_WRITE_REGISTERS}.get(function, 1)
        blocks += _coalesce(key, group, 0, limit)
    return tuple(blocks)


def poll_line_time_s(blocks: Sequence[Block], baud: int, parity: str = "none",
                     stop_bits: int = 1) -> float:
    """Line time (s) of one transaction per block on an RTU line at ``baud``: the sum of
    ``pdu.rtu_transaction_s`` (request, response, two frame gaps; no device delay)."""
    total = 0.0
    for b in blocks:
        values = () if b.function in pdu.READ_FUNCTIONS else \
            (False,) * b.count if b.function in pdu.BIT_FUNCTIONS else (0,) * b.count
        total += pdu.rtu_transaction_s(b.request(values), baud, parity, stop_bits)
    return total
