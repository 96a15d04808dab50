"""plc.modbus.pdu against the examples of the Modbus specifications, byte for byte.

Table-driven: each request / response pair is the example of the Modbus Application Protocol
Specification V1.1b3 for its function code (§6.1-6.12; the address field there is 0-based).
RTU frames (CRC-16, low byte first on the wire) from Modbus over Serial Line V1.02; MBAP
from Modbus Messaging on TCP/IP V1.0b. No sockets, no clock.
"""

from __future__ import annotations

import pytest

from plc.modbus import pdu
from plc.modbus.pdu import ExceptionResponse, FrameError, Request

H = bytes.fromhex

# (request, request PDU, response data, response PDU) -- spec §6.1-6.12 examples
SPEC_EXAMPLES = [
    # §6.1 read coils 20-38 (address 19, 19 coils): CD 6B 05
    (Request(1, 0x13, 19), H("01 0013 0013"),
     (True, False, True, True, False, False, True, True,       # 0xCD, coils 20..27
      True, True, False, True, False, True, True, False,       # 0x6B, coils 28..35
      True, False, True),                                      # 0x05, coils 36..38
     H("01 03 CD 6B 05")),
    # §6.2 read discrete inputs 197-218 (address 196, 22 inputs): AC DB 35
    (Request(2, 0xC4, 22), H("02 00C4 0016"),
     (False, False, True, True, False, True, False, True,      # 0xAC
      True, True, False, True, True, False, True, True,        # 0xDB
      True, False, True, False, True, True),                   # 0x35
     H("02 03 AC DB 35")),
    # §6.3 read holding registers 108-110 (address 107): 555, 0, 100
    (Request(3, 0x6B, 3), H("03 006B 0003"), (555, 0, 100), H("03 06 022B 0000 0064")),
    # §6.4 read input register 9 (address 8): 10
    (Request(4, 0x08, 1), H("04 0008 0001"), (10,), H("04 02 000A")),
    # §6.5 write single coil 173 (address 172) ON: the reply echoes the request
    (Request(5, 0xAC, 1, (True,)), H("05 00AC FF00"), (), H("05 00AC FF00")),
    (Request(5, 0xAC, 1, (False,)), H("05 00AC 0000"), (), H("05 00AC 0000")),
    # §6.6 write register 2 (address 1) = 3
    (Request(6, 0x01, 1, (3,)), H("06 0001 0003"), (), H("06 0001 0003")),
    # §6.11 write coils 20-29 (address 19): CD 01
    (Request(15, 0x13, 10, (True, False, True, True, False, False, True, True, True, False)),
     H("0F 0013 000A 02 CD 01"), (), H("0F 0013 000A")),
    # §6.12 write registers 2-3 (address 1) = 0x000A, 0x0102
    (Request(16, 0x01, 2, (0x000A, 0x0102)), H("10 0001 0002 04 000A 0102"), (),
     H("10 0001 0002")),
]
IDS = [f"fc{req.function}-{req.address}" for req, *_ in SPEC_EXAMPLES]


@pytest.mark.parametrize("req, request_pdu, data, response_pdu", SPEC_EXAMPLES, ids=IDS)
def test_spec_example_request(req, request_pdu, data, response_pdu):
    assert pdu.encode_request(req) == request_pdu
    assert pdu.decode_request(request_pdu) == req
    assert pdu.request_pdu_length(request_pdu[:6]) == len(request_pdu)


@pytest.mark.parametrize("req, request_pdu, data, response_pdu", SPEC_EXAMPLES, ids=IDS)
def test_spec_example_response(req, request_pdu, data, response_pdu):
    assert pdu.encode_response(req, data) == response_pdu
    assert pdu.response_pdu_length(req) == len(response_pdu)
    assert pdu.decode_response(req, response_pdu) == data


def test_request_length_needs_the_byte_count_of_multiple_writes():
    assert pdu.request_pdu_length(b"") is None
    assert pdu.request_pdu_length(H("10 0001 0002")) is None      # byte count not yet read
    assert pdu.request_pdu_length(H("10 0001 0002 04")) == 10
    assert pdu.request_pdu_length(H("03")) == 5
    with pytest.raises(FrameError, match="unknown function code 7"):
        pdu.request_pdu_length(H("07"))


# --------------------------------------------------------------------------- exceptions


@pytest.mark.parametrize("reply, code, name", [
    (H("81 02"), 2, "illegal data address"),      # spec §7 example: read coils, address 0x04A1
    (H("81 01"), 1, "illegal function"),
    (H("81 04"), 4, "server device failure"),
    (H("81 0B"), 11, "gateway target device failed to respond"),
    (H("81 63"), 99, "unknown exception"),
])
def test_exception_reply(reply, code, name):
    with pytest.raises(ExceptionResponse) as info:
        pdu.decode_response(Request(1, 0x04A1, 1), reply)
    assert (info.value.function, info.value.code, info.value.name) == (1, code, name)
    assert pdu.encode_exception(1, code) == reply
    assert f"exception code {code}" in str(info.value)


@pytest.mark.parametrize("request_pdu, code", [
    (H("07 0000 0001"), 1),                      # a function this stack does not serve
    (H("2B 0E 01 00"), 1),                       # encapsulated interface transport
    (H("03 0000"), 3),                           # too short
    (H("03 0000 0001 00"), 3),                   # trailing byte after a fixed-length request
    (H("03 0000 0000"), 3),                      # quantity 0
    (H("03 0000 007E"), 3),                      # 126 registers > 125
    (H("01 0000 07D1"), 3),                      # 2001 coils > 2000
    (H("03 FFFF 0002"), 3),                      # past address 65535
    (H("05 0000 1234"), 3),                      # a coil is FF00 or 0000
    (H("0F 0000 000A 01 FF"), 3),                # 10 coils need 2 bytes
    (H("0F 0000 000A 02 FF"), 3),                # byte count says 2, one byte follows
    (H("10 0000 0002 02 0001"), 3),              # 2 registers need 4 bytes
    (H("10 0000 007C F8") + bytes(248), 3),      # 124 registers > 123
    (H("0F 0000 07B1 F7") + bytes(247), 3),      # 1969 coils > 1968
])
def test_bad_request_gives_the_exception_a_slave_answers(request_pdu, code):
    with pytest.raises(ExceptionResponse) as info:
        pdu.decode_request(request_pdu)
    assert info.value.code == code


def test_empty_request_is_a_frame_error():
    with pytest.raises(FrameError):
        pdu.decode_request(b"")


@pytest.mark.parametrize("req", [
    Request(3, 0, 0), Request(3, 0, 126), Request(16, 0, 124, (0,) * 124),
    Request(3, 65535, 2), Request(6, 0, 1, (0x10000,)), Request(16, 0, 2, (1,)), Request(9, 0, 1),
])
def test_master_refuses_to_encode_what_no_device_accepts(req):
    with pytest.raises(ExceptionResponse):
        pdu.encode_request(req)


# --------------------------------------------------------------------------- replies that are not


@pytest.mark.parametrize("req, reply, reason", [
    (Request(3, 0x6B, 3), b"", "empty reply"),
    (Request(3, 0x6B, 3), H("04 06 022B 0000 0064"), "reply to function 4, expected 3"),
    (Request(3, 0x6B, 3), H("03 04 022B 0000"), "reply of 6 bytes, expected 8"),
    (Request(3, 0x6B, 3), H("03 05 022B 0000 0064"), "byte count 5 in a reply of 6 data bytes"),
    (Request(1, 0x13, 19), H("01 03 CD 6B"), "reply of 4 bytes, expected 5"),
    (Request(3, 0x6B, 3), H("83 02 00"), "exception reply of 3 bytes"),
    (Request(6, 1, 1, (3,)), H("06 0001 0004"), "write reply does not echo the request"),
    (Request(16, 1, 2, (1, 2)), H("10 0001 0003"), "write reply does not echo the request"),
    (Request(5, 0xAC, 1, (True,)), H("05 00AC 0000"), "write reply does not echo the request"),
])
def test_reply_that_does_not_answer_the_request_is_a_frame_error(req, reply, reason):
    with pytest.raises(FrameError) as info:
        pdu.decode_response(req, reply)
    assert info.value.reason == reason


def test_response_data_must_fit_the_request():
    with pytest.raises(ValueError):
        pdu.encode_response(Request(3, 0, 3), (1, 2))


# --------------------------------------------------------------------------- RTU framing


@pytest.mark.parametrize("unit, body, crc", [
    (0x01, H("03 0000 000A"), H("C5 CD")),          # the classic read of 10 registers
    (0x01, H("03 0000 0001"), H("84 0A")),
    (0x11, H("03 006B 0003"), H("76 87")),          # serial-line spec example, slave 17
])
def test_rtu_frame_appends_the_crc_low_byte_first(unit, body, crc):
    frame = pdu.rtu_frame(unit, body)
    assert frame == bytes((unit,)) + body + crc
    assert pdu.crc16(frame[:-2]) == int.from_bytes(crc, "little")
    assert pdu.crc16(frame) == 0                    # a frame with its CRC checks to zero
    assert pdu.rtu_unframe(frame) == (unit, body)


@pytest.mark.parametrize("adu, reason", [
    (H("01 03 C5"), "frame of 3 bytes"),
    (H("01 03 0000 000A C5 CE"), "CRC mismatch"),
    (H("02 03 0000 000A C5 CD"), "CRC mismatch"),   # another unit, same CRC: not ours
])
def test_rtu_unframe_rejects_garbage(adu, reason):
    with pytest.raises(FrameError) as info:
        pdu.rtu_unframe(adu)
    assert info.value.reason == reason


@pytest.mark.parametrize("baud, parity, stop_bits, char_s, gap_s", [
    (9600, "even", 1, 11 / 9600, 3.5 * 11 / 9600),
    (19200, "even", 1, 11 / 19200, 3.5 * 11 / 19200),
    (19200, "none", 2, 11 / 19200, 3.5 * 11 / 19200),
    (19200, "none", 1, 10 / 19200, 3.5 * 10 / 19200),
    (38400, "even", 1, 11 / 38400, 0.00175),         # fixed 1.75 ms above 19200 baud
    (115200, "odd", 1, 11 / 115200, 0.00175),
])
def test_character_time_and_frame_gap(baud, parity, stop_bits, char_s, gap_s):
    assert pdu.char_time_s(baud, parity, stop_bits) == pytest.approx(char_s)
    assert pdu.frame_gap_s(baud, parity, stop_bits) == pytest.approx(gap_s)


def test_rtu_transaction_time_counts_both_frames_and_both_gaps():
    # read 3 holding registers: request 1+5+2 = 8 chars, reply 1+8+2 = 11 chars
    req = Request(3, 0x6B, 3)
    char, gap = 11 / 19200, 3.5 * 11 / 19200
    assert pdu.rtu_transaction_s(req, 19200, "even", 1) == pytest.approx(19 * char + 2 * gap)
    # write 2 registers: request 1+10+2 = 13 chars, reply 1+5+2 = 8 chars
    w = Request(16, 1, 2, (10, 258))
    assert pdu.rtu_transaction_s(w, 19200, "even", 1) == pytest.approx(21 * char + 2 * gap)


# --------------------------------------------------------------------------- TCP framing


def test_mbap_frame_and_header():
    body = H("03 006B 0003")
    frame = pdu.mbap_frame(0x0001, 0x11, body)
    # transaction 1, protocol 0, length 6 (unit + 5 PDU bytes), unit 0x11
    assert frame == H("0001 0000 0006 11") + body
    assert pdu.mbap_header(frame[:pdu.MBAP_LEN]) == (1, 0x11, 5)
    assert pdu.mbap_frame(0x1_0005, 1, body)[:2] == H("0005")     # ids wrap at 16 bits


@pytest.mark.parametrize("header, reason", [
    (H("0001 0001 0006 11"), "protocol id 1 in the MBAP header"),
    (H("0001 0000 0001 11"), "length 1 in the MBAP header"),      # a unit id and no PDU
    (H("0001 0000 00FF 11"), "length 255 in the MBAP header"),    # PDU of at most 253 bytes
    (H("0001 0000 00"), "MBAP header of 5 bytes"),
])
def test_mbap_header_rejects_garbage(header, reason):
    with pytest.raises(FrameError) as info:
        pdu.mbap_header(header)
    assert info.value.reason == reason


def test_request_properties():
    assert Request(1, 0).is_bits and Request(15, 0, 1, (True,)).is_bits
    assert not Request(3, 0).is_bits and not Request(16, 0, 1, (0,)).is_bits
