"""The register codec: a point's engineering value <-> the Modbus bits or registers that carry it.

One job: encode and decode, nothing else. Pure (no pydantic, no asyncio, no clock, no sockets):
values and registers in, values and registers out. Both ends of the wire use it: the master's
links (``plc.modbus.link``) and the twin's slave (``twin.modbus_slave``), so the two agree by
construction. The validated description of each point (``plc.modbus.regmap.PointMap``) and the
request planning live in ``plc.modbus.regmap``; this module only needs a point's coding fields
(``CodedPoint``).

Coding (Modbus Application Protocol V1.1b3 §4.3 data model; the legacy ``Mapping.csv``):
- ``Table``: the four data tables; each function code addresses one (``TABLE_OF_FUNCTION``).
- bool: on a bit function one coil or discrete input; on a register with ``bits`` true when
  every listed bit is set (written by setting or clearing every listed bit, ``apply_bits``);
  on a register without ``bits`` true when not 0, written as 1 / 0.
- numbers (``DataType``): int16, uint16 (one register), int32, uint32, float32 (two),
  in the word and byte order ``WordOrder`` (ABCD big-endian, CDAB word swap, BADC byte swap,
  DCBA both; on one register ABCD = CDAB and BADC = DCBA);
  engineering value = raw * scale + offset (scale never 0: the map refuses it).
- Writing: raw = round((value - offset) / scale) clamped to the type's range (float32: not
  rounded, clamped to the float32 range); NaN to an integer type is a ValueError.
- A ``Block`` (one request's worth of points) is decoded from, or encoded to, the ``count``
  bits or registers of its request; bools packed into one register share it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Protocol, Sequence

from . import pdu
from .pdu import Request

__all__ = [
    "Block", "CodedPoint", "DataType", "TABLE_OF_FUNCTION", "Table", "WIDE_TYPES", "WordOrder",
    "apply_bits", "decode_block", "decode_registers", "encode_block", "encode_registers",
]


class DataType(str, Enum):
    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT32 = "float32"


class WordOrder(str, Enum):
    ABCD = "ABCD"
    CDAB = "CDAB"
    BADC = "BADC"
    DCBA = "DCBA"


class Table(str, Enum):
    """The four Modbus data tables; every function code addresses one."""

    COILS = "coils"                  # 1 read, 5/15 write
    DISCRETE_INPUTS = "discrete"     # 2 read
    HOLDING = "holding"              # 3 read, 6/16 write
    INPUT = "input"                  # 4 read


TABLE_OF_FUNCTION = {1: Table.COILS, 2: Table.DISCRETE_INPUTS, 3: Table.HOLDING, 4: Table.INPUT,
                     5: Table.COILS, 6: Table.HOLDING, 15: Table.COILS, 16: Table.HOLDING}

#: the types that take two registers
WIDE_TYPES = frozenset({DataType.INT32, DataType.UINT32, DataType.FLOAT32})
#: struct format (big-endian) and raw range of each number type
_FORMAT = {DataType.INT16: ">h", DataType.UINT16: ">H", DataType.INT32: ">i",
           DataType.UINT32: ">I", DataType.FLOAT32: ">f"}
_FLOAT32_MAX = 3.4028234663852886e38
_RANGE = {DataType.INT16: (-0x8000, 0x7FFF), DataType.UINT16: (0, 0xFFFF),
          DataType.INT32: (-0x80000000, 0x7FFFFFFF), DataType.UINT32: (0, 0xFFFFFFFF),
          DataType.FLOAT32: (-_FLOAT32_MAX, _FLOAT32_MAX)}


class CodedPoint(Protocol):
    """What the codec reads of a point (``plc.modbus.regmap.PointMap`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> int: ...
    @property
    def bits(self) -> tuple[int, ...]: ...
    @property
    def type(self) -> DataType: ...
    @property
    def order(self) -> WordOrder: ...
    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...
    @property
    def width(self) -> int: ...        # registers the value occupies (2 for WIDE_TYPES), or 1 bit
    @property
    def is_bit(self) -> bool: ...      # on a bit function (1, 2, 5, 15)


# --------------------------------------------------------------------------- one point


def _reorder(data: bytes, order: WordOrder) -> bytes:
    """Register bytes <-> value bytes (big-endian); each order is its own inverse. On one
    register CDAB changes nothing and BADC / DCBA swap its two bytes."""
    if order is WordOrder.ABCD:
        return data
    if order is WordOrder.DCBA:
        return data[::-1]
    words = [data[k:k + 2] for k in range(0, len(data), 2)]
    if order is WordOrder.CDAB:
        return b"".join(reversed(words))
    return b"".join(w[::-1] for w in words)         # BADC


def decode_registers(p: CodedPoint, regs: Sequence[int]) -> float | bool:
    """The engineering value of ``p`` from its ``p.width`` registers (or its one bit).
    bool: with ``bits`` true when every listed bit is set, else when the register is not 0.
    Numbers: raw per type and order, then ``raw * scale + offset`` as a float."""
    if p.type is DataType.BOOL:
        if p.bits:
            return all(int(regs[0]) >> b & 1 for b in p.bits)
        return bool(regs[0])
    data = _reorder(b"".join(int(r).to_bytes(2, "big") for r in regs[:p.width]), p.order)
    (raw,) = struct.unpack(_FORMAT[p.type], data)
    return raw * p.scale + p.offset


def encode_registers(p: CodedPoint, value: float | bool) -> tuple[int, ...]:
    """The registers that carry ``value`` for ``p`` (inverse of ``decode_registers``).
    Numbers: raw = round((value - offset) / scale) clamped to the type's range (float32: not
    rounded, clamped to the float32 range). bool: 1 / 0, or the bits set / clear in an
    otherwise empty register (a block composes shared registers, see ``encode_block``).
    ValueError for NaN to an integer type."""
    if p.type is DataType.BOOL:
        return (apply_bits(p, 0, bool(value)) if p.bits else int(bool(value)),)
    raw = (float(value) - p.offset) / p.scale
    lo, hi = _RANGE[p.type]
    if p.type is DataType.FLOAT32:
        raw = raw if math.isnan(raw) else min(max(raw, lo), hi)
    elif math.isnan(raw):
        raise ValueError(f"{p.name}: cannot write NaN as {p.type.value}")
    else:
        raw = int(min(max(round(raw) if math.isfinite(raw) else raw, lo), hi))
    data = _reorder(struct.pack(_FORMAT[p.type], raw), p.order)
    return tuple(int.from_bytes(data[k:k + 2], "big") for k in range(0, len(data), 2))


def apply_bits(p: CodedPoint, word: int, value: bool) -> int:
    """``word`` with every bit of ``p.bits`` set (``value`` true) or cleared."""
    mask = sum(1 << b for b in set(p.bits))
    return (word | mask) if value else (word & ~mask & 0xFFFF)


# --------------------------------------------------------------------------- one request


@dataclass(frozen=True)
class Block:
    """One request's worth of points: ``count`` bits or registers from ``address``
    (made by ``plc.modbus.regmap.plan_reads`` / ``plan_writes``)."""

    link: str
    unit: int
    function: int
    address: int
    count: int
    points: tuple[CodedPoint, ...]

    @property
    def end(self) -> int:
        """First address after the block."""
        return self.address + self.count

    def request(self, values: tuple = ()) -> Request:
        return Request(self.function, self.address, self.count, tuple(values))


def decode_block(block: Block, data: Sequence) -> dict[str, float | bool]:
    """Point name -> engineering value, from the ``block.count`` bits or registers its read
    returned. ValueError if ``data`` has another length."""
    if len(data) != block.count:
        raise ValueError(f"{len(data)} values for a block of {block.count}")
    values: dict[str, float | bool] = {}
    for p in block.points:
        at = p.address - block.address
        if p.is_bit:
            values[p.name] = bool(data[at])
        else:
            values[p.name] = decode_registers(p, data[at:at + p.width])
    return values


def encode_block(block: Block, values: Mapping[str, bool | float]) -> tuple:
    """The ``block.count`` bits (bools) or registers (ints) that write ``values`` (one per
    point of the block; KeyError if one is missing). A register with packed bits is composed
    of every point of the block mapped into it; its other bits are 0."""
    if block.function in pdu.BIT_FUNCTIONS:
        bits = [False] * block.count
        for p in block.points:
            bits[p.address - block.address] = bool(values[p.name])
        return tuple(bits)
    words = [0] * block.count
    for p in block.points:
        at = p.address - block.address
        if p.bits:
            words[at] = apply_bits(p, words[at], bool(values[p.name]))
        else:
            words[at:at + p.width] = encode_registers(p, values[p.name])
    return tuple(words)
