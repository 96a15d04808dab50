"""Modbus PDUs and their two framings, bytes in and bytes out (no I/O).

Follows the Modbus Application Protocol Specification V1.1b3 (function codes, PDU layouts,
exception codes, quantity limits) and Modbus over Serial Line V1.02 (RTU framing, CRC-16,
the 3.5-character frame gap) and Modbus Messaging on TCP/IP V1.0b (the MBAP header). Both the
master (``plc.modbus.link``) and the twin's slave (``twin.modbus_slave``) use this module.

Error tree (what went wrong, and who is at fault)::

    ModbusError
    ├── FrameError          the bytes on the wire are not a valid reply/request: bad CRC,
    │                       wrong length, wrong unit/function/transaction id (garbage)
    └── ExceptionResponse   the device understood and refused: exception code N (.code)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

READ_COILS = 1
READ_DISCRETE_INPUTS = 2
READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_COILS = 15
WRITE_MULTIPLE_REGISTERS = 16

READ_FUNCTIONS = frozenset({1, 2, 3, 4})
WRITE_FUNCTIONS = frozenset({5, 6, 15, 16})
BIT_FUNCTIONS = frozenset({1, 2, 5, 15})
FUNCTIONS = READ_FUNCTIONS | WRITE_FUNCTIONS

# quantity limits per request (spec §6.1-6.12)
MAX_READ_BITS = 2000
MAX_READ_REGISTERS = 125
MAX_WRITE_BITS = 1968
MAX_WRITE_REGISTERS = 123

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ModbusError(Exception):
    """Base of every protocol-level failure."""


class FrameError(ModbusError):
    """Bytes that are not a valid Modbus frame (garbage, bad CRC, mismatched reply)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ExceptionResponse(ModbusError):
    """The device answered with an exception response (function | 0x80, code)."""

    def __init__(self, function: int, code: int):
        self.function = function
        self.code = code
        self.name = EXCEPTION_NAMES.get(code, "unknown exception")
        super().__init__(f"exception code {code} ({self.name}) to function {function}")


@dataclass(frozen=True, slots=True)
class Request:
    """One request. ``count`` is the quantity (bits or registers); writes carry ``values``
    (bools for coils, 0..65535 ints for registers); single writes have count 1."""

    function: int
    address: int
    count: int = 1
    values: tuple = ()

    @property
    def is_bits(self) -> bool:
        return self.function in BIT_FUNCTIONS


def _limit(function: int) -> int:
    return {1: MAX_READ_BITS, 2: MAX_READ_BITS, 3: MAX_READ_REGISTERS, 4: MAX_READ_REGISTERS,
            5: 1, 6: 1, 15: MAX_WRITE_BITS, 16: MAX_WRITE_REGISTERS}[function]


def check_request(req: Request) -> None:
    """Raise ``ExceptionResponse`` (code 1 or 3, as a slave would) for a request no device
    could accept: unknown function, quantity 0 or over the limit, or past address 65535."""
    if req.function not in FUNCTIONS:
        raise ExceptionResponse(req.function, 1)
    if not 1 <= req.count <= _limit(req.function) or not 0 <= req.address <= 0xFFFF \
            or req.address + req.count > 0x10000:
        raise ExceptionResponse(req.function, 3)
    if req.function in WRITE_FUNCTIONS:
        if len(req.values) != req.count:
            raise ExceptionResponse(req.function, 3)
        if not req.is_bits and any(not 0 <= int(v) <= 0xFFFF for v in req.values):
            raise ExceptionResponse(req.function, 3)


def _pack_bits(bits: Sequence[bool]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unpack_bits(data: bytes, count: int) -> tuple[bool, ...]:
    return tuple(bool(data[i // 8] >> (i % 8) & 1) for i in range(count))


# -- requests (master encodes, slave decodes) ---------------------------------------------

def encode_request(req: Request) -> bytes:
    check_request(req)
    f, a, n = req.function, req.address, req.count
    if f in READ_FUNCTIONS:
        return struct.pack(">BHH", f, a, n)
    if f == WRITE_SINGLE_COIL:
        return struct.pack(">BHH", f, a, 0xFF00 if req.values[0] else 0x0000)
    if f == WRITE_SINGLE_REGISTER:
        return struct.pack(">BHH", f, a, int(req.values[0]))
    if f == WRITE_MULTIPLE_COILS:
        data = _pack_bits(req.values)
        return struct.pack(">BHHB", f, a, n, len(data)) + data
    data = struct.pack(f">{n}H", *(int(v) for v in req.values))
    return struct.pack(">BHHB", f, a, n, len(data)) + data


def request_pdu_length(prefix: bytes) -> int | None:
    """Length of the request PDU that starts with ``prefix``, or None if more bytes are needed.
    Raises FrameError for a function code this stack does not serve (the caller resyncs)."""
    if not prefix:
        return None
    f = prefix[0]
    if f in (1, 2, 3, 4, 5, 6):
        return 5
    if f in (15, 16):
        return None if len(prefix) < 6 else 6 + prefix[5]
    raise FrameError(f"unknown function code {f}")


def decode_request(pdu: bytes) -> Request:
    """The request in ``pdu``. Raises ExceptionResponse (1: unknown function, 3: bad quantity
    or inconsistent byte count), which the slave turns into an exception response."""
    if not pdu:
        raise FrameError("empty PDU")
    f = pdu[0]
    if f not in FUNCTIONS:
        raise ExceptionResponse(f, 1)
    if len(pdu) < 5 or f not in (WRITE_MULTIPLE_COILS, WRITE_MULTIPLE_REGISTERS) and len(pdu) != 5:
        raise ExceptionResponse(f, 3)   # functions 1-6 are exactly 5 bytes
    a, v = struct.unpack_from(">HH", pdu, 1)
    if f in READ_FUNCTIONS:
        req = Request(f, a, v)
    elif f == WRITE_SINGLE_COIL:
        if v not in (0x0000, 0xFF00):
            raise ExceptionResponse(f, 3)
        req = Request(f, a, 1, (v == 0xFF00,))
    elif f == WRITE_SINGLE_REGISTER:
        req = Request(f, a, 1, (v,))
    else:
        if len(pdu) < 6 or len(pdu) != 6 + pdu[5]:
            raise ExceptionResponse(f, 3)
        data = pdu[6:]
        if f == WRITE_MULTIPLE_COILS:
            if len(data) != (v + 7) // 8:
                raise ExceptionResponse(f, 3)
            req = Request(f, a, v, _unpack_bits(data, v))
        else:
            if len(data) != 2 * v:
                raise ExceptionResponse(f, 3)
            req = Request(f, a, v, struct.unpack(f">{v}H", data))
    check_request(req)
    return req


# -- responses (slave encodes, master decodes) --------------------------------------------

def encode_response(req: Request, data: Sequence = ()) -> bytes:
    """The normal response to ``req``; reads pass the ``count`` bits or registers read."""
    f = req.function
    if f in READ_FUNCTIONS:
        if len(data) != req.count:
            raise ValueError(f"{len(data)} values for a read of {req.count}")
        body = _pack_bits(data) if f in (1, 2) else struct.pack(f">{req.count}H", *data)
        return struct.pack(">BB", f, len(body)) + body
    if f in (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER):
        return encode_request(req)  # the echo
    return struct.pack(">BHH", f, req.address, req.count)


def encode_exception(function: int, code: int) -> bytes:
    return bytes((function | 0x80, code))


def response_pdu_length(req: Request) -> int:
    """Length of the normal response PDU to ``req`` (an exception response is 2 bytes)."""
    if req.function in (1, 2):
        return 2 + (req.count + 7) // 8
    if req.function in (3, 4):
        return 2 + 2 * req.count
    return 5


def decode_response(req: Request, pdu: bytes) -> tuple:
    """The bits (tuple of bool) or registers (tuple of int) a read returned; ``()`` for a
    write. Raises ExceptionResponse for an exception reply, FrameError for anything that is
    not the reply to ``req`` (wrong function, byte count, echo or length)."""
    if not pdu:
        raise FrameError("empty reply")
    f = pdu[0]
    if f == req.function | 0x80:
        if len(pdu) != 2:
            raise FrameError(f"exception reply of {len(pdu)} bytes")
        raise ExceptionResponse(req.function, pdu[1])
    if f != req.function:
        raise FrameError(f"reply to function {f}, expected {req.function}")
    if len(pdu) != response_pdu_length(req):
        raise FrameError(f"reply of {len(pdu)} bytes, expected {response_pdu_length(req)}")
    if f in READ_FUNCTIONS:
        if pdu[1] != len(pdu) - 2:
            raise FrameError(f"byte count {pdu[1]} in a reply of {len(pdu) - 2} data bytes")
        if f in (1, 2):
            return _unpack_bits(pdu[2:], req.count)
        return struct.unpack(f">{req.count}H", pdu[2:])
    if pdu != encode_response(req):
        raise FrameError("write reply does not echo the request")
    return ()


# -- RTU framing (Modbus over Serial Line V1.02 §2.5) -------------------------------------

def _crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC = _crc_table()


def crc16(data: bytes) -> int:
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC[(crc ^ b) & 0xFF]
    return crc


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    body = bytes((unit,)) + pdu
    return body + struct.pack("<H", crc16(body))


def rtu_unframe(adu: bytes) -> tuple[int, bytes]:
    """(unit, pdu) of an RTU frame; FrameError on a short frame or a CRC mismatch."""
    if len(adu) < 4:
        raise FrameError(f"frame of {len(adu)} bytes")
    if crc16(adu[:-2]) != struct.unpack("<H", adu[-2:])[0]:
        raise FrameError("CRC mismatch")
    return adu[0], adu[1:-2]


def char_time_s(baud: int, parity: str = "none", stop_bits: int = 1) -> float:
    """Time of one character on the line: start bit, 8 data bits, parity bit, stop bits."""
    bits = 1 + 8 + (0 if parity == "none" else 1) + stop_bits
    return bits / baud


def frame_gap_s(baud: int, parity: str = "none", stop_bits: int = 1) -> float:
    """The silent interval between frames: 3.5 characters, fixed at 1.75 ms above 19200 baud."""
    return 0.00175 if baud > 19200 else 3.5 * char_time_s(baud, parity, stop_bits)


def rtu_transaction_s(req: Request, baud: int, parity: str = "none", stop_bits: int = 1) -> float:
    """Line time of one RTU transaction: request, gap, normal response, gap (no device delay)."""
    chars = (1 + len(encode_request(req)) + 2) + (1 + response_pdu_length(req) + 2)
    return chars * char_time_s(baud, parity, stop_bits) + 2 * frame_gap_s(baud, parity, stop_bits)


# -- TCP framing (MBAP header, Modbus Messaging on TCP/IP V1.0b §3.1.3) -------------------

MBAP_LEN = 7


def mbap_frame(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid & 0xFFFF, 0, len(pdu) + 1, unit) + pdu


def mbap_header(header: bytes) -> tuple[int, int, int]:
    """(transaction id, unit, PDU length) of a 7-byte MBAP header; FrameError if malformed."""
    if len(header) != MBAP_LEN:
        raise FrameError(f"MBAP header of {len(header)} bytes")
    tid, proto, length, unit = struct.unpack(">HHHB", header)
    if proto != 0:
        raise FrameError(f"protocol id {proto} in the MBAP header")
    if not 2 <= length <= 254:
        raise FrameError(f"length {length} in the MBAP header")
    return tid, unit, length - 1
