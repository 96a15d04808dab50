"""The twin's Modbus face (``twin.modbus_slave``) against independent masters.

mbpoll (the Debian command-line master, built on libmodbus) and pymodbus 3.16 read and write
the twin over TCP on loopback and over RTU through a pty pair made by socat; the faults are
observed from outside, with pymodbus or a raw socket / raw serial line; the RTU framer and the
communication watchdog are also checked in virtual time, without sockets.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from opcua_server.config import load
from plc.modbus import pdu
from plc.modbus.pdu import FrameError, Request
from plc.modbus.transport import open_serial
from twin import Twin
from twin.modbus_slave import RtuFramer, TwinSlave

MBPOLL = shutil.which("mbpoll")
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
TEMPS = ("temp_tank_bottom", "temp_tank_wall", "temp_pump", "temp_fountain")
COILS = ("heater_tank_bottom", "heater_tank_wall", "heater_pump", "heater_fountain",
         "cool1_tank", "cool2_tank")


@pytest.fixture(scope="module")
def app():
    return load()


# -- helpers ------------------------------------------------------------------------------

async def mbpoll(*args: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """Run mbpoll once (0-based addresses, one poll, 0.5 s reply timeout): (exit code, output)."""
    if MBPOLL is None:
        pytest.fail("mbpoll is not installed (make system-deps)")
    proc = await asyncio.create_subprocess_exec(
        MBPOLL, "-1", "-0", "-o", "0.5", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
    return proc.returncode, out.decode(errors="replace")


def polled(out: str) -> dict[int, str]:
    """The ``[address]: value`` lines of mbpoll's output (a register over 32767 is shown as
    ``65036 (-500)``: the unsigned value, then the signed one)."""
    return {int(a): v for a, v in re.findall(r"^\[(\d+)\]:\s+(\S+(?: \(-?\d+\))?)\s*$", out, re.M)}


def int16(shown: str) -> int:
    signed = re.search(r"\((-?\d+)\)", shown)
    return int(signed.group(1) if signed else shown)


async def tcp_exchange(port: int, unit: int, request_pdu: bytes, tid: int = 7,
                       timeout_s: float = 1.0) -> tuple[bytes, bytes]:
    """One raw MBAP request on a new connection: (7-byte header, PDU) of the reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(pdu.mbap_frame(tid, unit, request_pdu))
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(pdu.MBAP_LEN), timeout_s)
        length = int.from_bytes(header[4:6], "big") - 1
        return header, await asyncio.wait_for(reader.readexactly(max(length, 0)), timeout_s)
    finally:
        writer.close()


class RawLine:
    """The master's end of the pty pair, raw: write a frame, collect what comes back."""

    def __init__(self, device: str):
        self.fd = open_serial(device, 19200, "none", 1)
        self.loop = asyncio.get_running_loop()
        self.rx = bytearray()
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        try:
            self.rx += os.read(self.fd, 4096)
        except OSError:
            pass

    async def exchange(self, data: bytes, listen_s: float = 0.3) -> bytes:
        self.rx.clear()
        os.write(self.fd, data)
        await asyncio.sleep(listen_s)
        return bytes(self.rx)

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)


def read_adu(unit: int, function: int, address: int, count: int = 1) -> bytes:
    return pdu.rtu_frame(unit, pdu.encode_request(Request(function, address, count)))


@pytest.fixture
async def client(twin_slave):
    c = AsyncModbusTcpClient("127.0.0.1", port=twin_slave.tcp_port, timeout=0.3, retries=0,
                             reconnect_delay=0)
    assert await c.connect()
    yield c
    c.close()


@pytest.fixture(params=["tcp", "rtu"])
async def line(request, twin_slave, pty_pair):
    """mbpoll's connection options and target, for TCP and for RTU (even parity, 19200)."""
    if request.param == "tcp":
        return ["-m", "tcp", "-p", str(twin_slave.tcp_port)], "127.0.0.1"
    master, slave_dev = pty_pair
    await twin_slave.start_rtu(slave_dev, 19200, "even", 1)
    return ["-m", "rtu", "-b", "19200", "-P", "even"], master


# -- mbpoll, over TCP and RTU --------------------------------------------------------------

async def test_mbpoll_reads_the_temperatures_as_int16_tenths(twin_slave, line):
    opts, target = line
    twin_slave.twin.set_sensor_fault("pump", "short")     # a negative reading: int16 sign
    twin_slave.update_inputs()
    rc, out = await mbpoll(*opts, "-a", "1", "-t", "3", "-r", "0", "-c", "4", target)
    assert rc == 0, out
    got = polled(out)
    truth = twin_slave.twin.read_inputs()
    assert {a: int16(v) / 10 for a, v in got.items()} == {i: truth[t] for i, t in enumerate(TEMPS)}
    assert truth["temp_pump"] < 0


async def test_mbpoll_reads_the_power_meter_floats_in_both_word_orders(twin_slave, line):
    opts, target = line
    truth = twin_slave.twin.read_inputs()
    rc, out = await mbpoll(*opts, "-a", "2", "-t", "3:float", "-r", "0", "-c", "3", target)  # CDAB
    assert rc == 0, out
    got = polled(out)
    assert {a: float(v) for a, v in got.items()} == pytest.approx(
        {0: truth["grid_v_l1"], 2: truth["grid_v_l2"], 4: truth["grid_v_l3"]}, rel=1e-6)
    rc, out = await mbpoll(*opts, "-a", "2", "-t", "3:float", "-r", "8", target)
    assert float(polled(out)[8]) == pytest.approx(truth["grid_freq"], rel=1e-6)
    # the motor currents are big-endian (ABCD, mbpoll -B): run the mixer for a while first
    rc, out = await mbpoll(*opts, "-a", "3", "-t", "4", "-r", "10", target, "1")
    assert rc == 0, out
    twin_slave.twin.step(5.0, twin_slave.outputs())
    twin_slave.update_inputs()
    truth = twin_slave.twin.read_inputs()
    assert truth["current_mixer"] > 0
    rc, out = await mbpoll(*opts, "-a", "2", "-t", "3:float", "-B", "-r", "14", "-c", "3", target)
    assert rc == 0, out
    got = {a: float(v) for a, v in polled(out).items()}
    assert got == pytest.approx({14: truth["current_mixer"], 16: truth["current_pump"],
                                 18: truth["current_vibration"]}, rel=1e-6)


async def test_mbpoll_reads_the_estop_bits_and_the_pedal(twin_slave, line):
    opts, target = line
    rc, out = await mbpoll(*opts, "-a", "3", "-t", "3", "-r", "0", target)
    assert rc == 0 and polled(out) == {0: "3"}, out           # both channels of the chain
    twin_slave.twin.set_estop(True)
    twin_slave.twin.set_pedal(True)
    twin_slave.update_inputs()
    rc, out = await mbpoll(*opts, "-a", "3", "-t", "3", "-r", "0", target)
    assert polled(out) == {0: "0"}, out
    rc, out = await mbpoll(*opts, "-a", "3", "-t", "1", "-r", "0", target)
    assert rc == 0 and polled(out) == {0: "1"}, out


async def test_mbpoll_writes_a_coil_that_reaches_the_outputs(twin_slave, line):
    opts, target = line
    assert not any(twin_slave.outputs().values())
    rc, out = await mbpoll(*opts, "-a", "3", "-t", "0", "-r", "1", target, "1")
    assert rc == 0 and "Written 1 references" in out, out
    outputs = twin_slave.outputs()
    assert outputs["heater_tank_wall"] and sum(outputs.values()) == 1
    rc, out = await mbpoll(*opts, "-a", "3", "-t", "0", "-r", "0", "-c", "6", target)
    assert polled(out) == {0: "0", 1: "1", 2: "0", 3: "0", 4: "0", 5: "0"}, out


async def test_mbpoll_sees_exception_2_on_an_unmapped_address(twin_slave, line):
    opts, target = line
    rc, out = await mbpoll(*opts, "-a", "1", "-t", "3", "-r", "100", target)
    assert rc != 0 and "Illegal data address" in out, out


# -- pymodbus, over TCP and RTU ------------------------------------------------------------

async def test_pymodbus_reads_and_writes_over_tcp(twin_slave, client):
    truth = twin_slave.twin.read_inputs()
    r = await client.read_input_registers(0, count=4, device_id=1)
    assert [client.convert_from_registers([x], client.DATATYPE.INT16) / 10 for x in r.registers] \
        == [truth[t] for t in TEMPS]
    r = await client.read_input_registers(0, count=20, device_id=2)   # the coalesced block
    v = client.convert_from_registers(r.registers[0:2], client.DATATYPE.FLOAT32, word_order="little")
    assert v == pytest.approx(truth["grid_v_l1"], rel=1e-6)
    assert r.registers[6:8] == [0, 0]            # a gap inside the meter's block reads 0
    assert not (await client.write_coils(0, [True, False, True, False, False, True], device_id=3)).isError()
    assert not (await client.write_register(10, 0b110, device_id=3)).isError()    # pump, vibration
    assert not (await client.write_coil(8, True, device_id=3)).isError()          # fc 5
    assert not (await client.write_register(11, 1, device_id=3)).isError()        # fc 6
    out = twin_slave.outputs()
    assert {n for n, on in out.items() if on} == {"heater_tank_bottom", "heater_pump", "cool2_tank",
                                                  "pump", "vibration", "vib_heater", "mold_heater"}
    r = await client.read_holding_registers(10, count=2, device_id=3)
    assert r.registers == [0b110, 1]
    assert twin_slave.served == {1: 1, 2: 1, 3: 5}


async def test_pymodbus_reads_and_writes_over_rtu(twin_slave, pty_pair):
    master, slave_dev = pty_pair
    await twin_slave.start_rtu(slave_dev, 19200, "none", 1)   # pyserial cannot set parity on a pty
    c = AsyncModbusSerialClient(master, baudrate=19200, parity="N", timeout=0.5, retries=0,
                                reconnect_delay=0)
    assert await c.connect()
    try:
        truth = twin_slave.twin.read_inputs()
        r = await c.read_input_registers(0, count=4, device_id=1)
        assert [x / 10 for x in r.registers] == [truth[t] for t in TEMPS]
        r = await c.read_input_registers(8, count=2, device_id=2)
        assert c.convert_from_registers(r.registers, c.DATATYPE.FLOAT32, word_order="little") \
            == pytest.approx(truth["grid_freq"], rel=1e-6)
        r = await c.read_discrete_inputs(0, count=1, device_id=3)
        assert r.bits[0] is False
        assert not (await c.write_coils(3, [True, True], device_id=3)).isError()
        assert not (await c.write_register(10, 0b001, device_id=3)).isError()
        out = twin_slave.outputs()
        assert {n for n, on in out.items() if on} == {"heater_fountain", "cool1_tank", "mixer"}
        r = await c.read_input_registers(0, count=1, device_id=3)       # estop, both channels
        assert r.registers == [3]
        r = await c.read_holding_registers(0, count=1, device_id=3)     # no holding register 0
        assert r.isError() and r.exception_code == 2
    finally:
        c.close()


# -- faults, observed from outside -------------------------------------------------------

async def test_silent_unit_times_out_while_the_others_answer(twin_slave, client):
    twin_slave.faults.silent_units.add(1)
    with pytest.raises(ModbusIOException):
        await client.read_input_registers(0, count=4, device_id=1)
    assert twin_slave.served[1] == 0
    c2 = AsyncModbusTcpClient("127.0.0.1", port=twin_slave.tcp_port, timeout=0.3, retries=0,
                              reconnect_delay=0)
    await c2.connect()
    try:
        assert not (await c2.read_input_registers(0, count=20, device_id=2)).isError()
        twin_slave.faults.clear()
        assert not (await c2.read_input_registers(0, count=4, device_id=1)).isError()
    finally:
        c2.close()


async def test_silence_of_every_unit_on_rtu(twin_slave, pty_pair):
    master, slave_dev = pty_pair
    await twin_slave.start_rtu(slave_dev, 19200, "none", 1)
    raw = RawLine(master)
    try:
        twin_slave.faults.silent_units.add(None)
        assert await raw.exchange(read_adu(2, 4, 0, 2), 0.15) == b""
        twin_slave.faults.clear()
        reply = await raw.exchange(read_adu(2, 4, 0, 2), 0.15)
        assert pdu.rtu_unframe(reply)[0] == 2
    finally:
        raw.close()


async def test_delay_makes_replies_slow(twin_slave):
    twin_slave.faults.delay_s[1] = 0.25
    req = pdu.encode_request(Request(4, 0, 4))
    t0 = time.monotonic()
    _, reply = await tcp_exchange(twin_slave.tcp_port, 1, req)
    assert time.monotonic() - t0 >= 0.25 and len(pdu.decode_response(Request(4, 0, 4), reply)) == 4
    t0 = time.monotonic()
    await tcp_exchange(twin_slave.tcp_port, 2, pdu.encode_request(Request(4, 0, 2)))
    assert time.monotonic() - t0 < 0.2                        # another unit is not slowed
    c = AsyncModbusTcpClient("127.0.0.1", port=twin_slave.tcp_port, timeout=0.1, retries=0,
                             reconnect_delay=0)
    await c.connect()
    try:
        with pytest.raises(ModbusIOException):                # a master with a short timeout
            await c.read_input_registers(0, count=4, device_id=1)
    finally:
        c.close()


async def test_exception_on_one_range_while_another_answers(twin_slave, client):
    twin_slave.faults.exceptions.append((2, 4, 0, 5, 2))
    twin_slave.faults.exceptions.append((None, None, 14, 14, 4))
    r = await client.read_input_registers(0, count=2, device_id=2)
    assert r.isError() and r.exception_code == 2
    r = await client.read_input_registers(4, count=4, device_id=2)      # overlaps 5
    assert r.isError() and r.exception_code == 2
    r = await client.read_input_registers(8, count=4, device_id=2)
    assert not r.isError() and len(r.registers) == 4
    r = await client.read_input_registers(12, count=4, device_id=2)     # 14, any unit/function
    assert r.isError() and r.exception_code == 4
    r = await client.read_input_registers(0, count=4, device_id=1)      # another unit
    assert not r.isError()


async def test_garbage_replies_on_tcp_with_and_without_a_valid_header(twin_slave):
    req = Request(4, 0, 4)
    twin_slave.faults.garbage_units.add(1)
    header, reply = await tcp_exchange(twin_slave.tcp_port, 1, pdu.encode_request(req), tid=0x1234)
    assert pdu.mbap_header(header)[:2] == (0x1234, 1)           # looks valid ...
    with pytest.raises(FrameError):                            # ... but is not the reply
        pdu.decode_response(req, reply)
    twin_slave.faults.garbage_mbap = False
    reader, writer = await asyncio.open_connection("127.0.0.1", twin_slave.tcp_port)
    try:
        writer.write(pdu.mbap_frame(1, 1, pdu.encode_request(req)))
        header = await asyncio.wait_for(reader.readexactly(pdu.MBAP_LEN), 1.0)
        with pytest.raises(FrameError):
            pdu.mbap_header(header)
    finally:
        writer.close()
    _, reply = await tcp_exchange(twin_slave.tcp_port, 2, pdu.encode_request(Request(4, 0, 2)))
    assert len(pdu.decode_response(Request(4, 0, 2), reply)) == 2   # unit 2 is clean


async def test_garbage_on_rtu_is_a_bad_crc(twin_slave, pty_pair):
    master, slave_dev = pty_pair
    await twin_slave.start_rtu(slave_dev, 19200, "none", 1)
    raw = RawLine(master)
    try:
        twin_slave.faults.garbage_units.add(3)
        reply = await raw.exchange(read_adu(3, 4, 0), 0.15)
        with pytest.raises(FrameError, match="CRC"):
            pdu.rtu_unframe(reply)
        assert len(reply) == 1 + pdu.response_pdu_length(Request(4, 0)) + 2
    finally:
        raw.close()


async def test_drop_connections_closes_every_tcp_connection(twin_slave):
    conns = [await asyncio.open_connection("127.0.0.1", twin_slave.tcp_port) for _ in range(3)]
    try:
        for i, (reader, writer) in enumerate(conns):     # several clients at once
            writer.write(pdu.mbap_frame(i, 1, pdu.encode_request(Request(4, 0, 1))))
            await asyncio.wait_for(reader.readexactly(pdu.MBAP_LEN + 4), 1.0)
        twin_slave.faults.drop_connections()
        for reader, _ in conns:
            assert await asyncio.wait_for(reader.read(100), 1.0) == b""
    finally:
        for _, writer in conns:
            writer.close()
    _, reply = await tcp_exchange(twin_slave.tcp_port, 1, pdu.encode_request(Request(4, 0, 1)))
    assert len(reply) == 4                                   # a new connection is served


# -- addresses, functions, units ------------------------------------------------------------

@pytest.mark.parametrize("unit, req, code", [
    (1, Request(4, 100, 1), 2),                 # past the temperature module's registers
    (1, Request(4, 3, 2), 2),                   # runs one past the last one
    (1, Request(3, 0, 1), 2),                   # the module has no holding registers
    (3, Request(15, 6, 1, (True,)), 2),         # coil 6 is not mapped (gap before 8)
    (3, Request(16, 10, 3, (0, 0, 0)), 2),      # register 12 is not mapped
    (3, Request(6, 0, 1, (1,)), 2),             # no holding register 0 on the digital I/O
    (2, Request(3, 0, 1), 2),
])
async def test_unmapped_addresses_give_exception_2(twin_slave, unit, req, code):
    _, reply = await tcp_exchange(twin_slave.tcp_port, unit, pdu.encode_request(req))
    with pytest.raises(pdu.ExceptionResponse) as e:
        pdu.decode_response(req, reply)
    assert e.value.code == code


async def test_unknown_function_and_unknown_unit_on_tcp(twin_slave):
    _, reply = await tcp_exchange(twin_slave.tcp_port, 1, bytes((7,)))      # read exception status
    assert reply == bytes((0x87, 1))
    _, reply = await tcp_exchange(twin_slave.tcp_port, 9, pdu.encode_request(Request(4, 0, 1)))
    assert reply == bytes((0x84, 11))
    _, reply = await tcp_exchange(twin_slave.tcp_port, 3, pdu.encode_request(Request(1, 6, 1)))
    assert pdu.decode_response(Request(1, 6, 1), reply) == (False,)     # inside the coil block


async def test_rtu_unknown_unit_is_silent_unknown_function_gets_exception_1(twin_slave, pty_pair):
    master, slave_dev = pty_pair
    await twin_slave.start_rtu(slave_dev, 19200, "none", 1)
    raw = RawLine(master)
    try:
        assert await raw.exchange(read_adu(9, 4, 0), 0.15) == b""
        reply = await raw.exchange(pdu.rtu_frame(1, bytes((0x2B, 0x0E, 0x01, 0x00))), 0.15)
        assert pdu.rtu_unframe(reply) == (1, bytes((0xAB, 1)))
        reply = await raw.exchange(read_adu(1, 4, 0, 4), 0.15)
        assert len(pdu.decode_response(Request(4, 0, 4), pdu.rtu_unframe(reply)[1])) == 4
    finally:
        raw.close()


async def test_rtu_resyncs_after_garbage_and_waits_the_frame_gap(twin_slave, pty_pair):
    master, slave_dev = pty_pair
    await twin_slave.start_rtu(slave_dev, 1200, "none", 1)     # 3.5 characters = 29 ms
    raw = RawLine(master)
    try:
        good = read_adu(1, 4, 0, 4)
        # noise glued to a request: the request is lost with the noise (bad CRC) ...
        assert await raw.exchange(b"\x01\x04\x00" + good, 0.2) == b""
        # ... and the next request after a silent gap is answered
        t0 = time.monotonic()
        os.write(raw.fd, good)
        while len(raw.rx) < 13 and time.monotonic() - t0 < 1.0:
            await asyncio.sleep(0.001)
        took = time.monotonic() - t0
        assert pdu.rtu_unframe(bytes(raw.rx))[0] == 1
        assert took >= pdu.frame_gap_s(1200, "none", 1)        # never before the 3.5 chars
        assert twin_slave._rtu_framer.discarded_bytes > 0
    finally:
        raw.close()


# -- pure: the RTU framer, the watchdog, the counters (virtual time, no sockets) ----------

def test_rtu_framer_finds_frames_by_length_and_crc_across_chunks():
    f = RtuFramer(0.002)
    a = read_adu(1, 4, 0, 4)
    b = pdu.rtu_frame(3, pdu.encode_request(Request(15, 0, 6, (True,) * 6)))
    assert f.feed(a[:3], 0.0) == []
    assert f.feed(a[3:] + b[:5], 0.0005) == [a]
    assert f.feed(b[5:], 0.001) == [b]
    bad = a[:-1] + bytes((a[-1] ^ 1,))
    assert f.feed(bad + a, 0.010) == [] and f.discarding          # bad CRC: discard ...
    assert f.feed(a, 0.0105) == []                                # ... until a silent gap
    assert f.feed(a, 0.020) == [a] and not f.discarding
    assert f.feed(a[:4], 0.030) == [] and f.feed(a, 0.040) == [a]  # a stale partial is dropped
    unknown = pdu.rtu_frame(1, bytes((0x2B, 0x0E)))
    assert f.feed(unknown, 0.050) == [] and f.silence(0.053) == [unknown]


def test_comm_watchdog_drops_the_outputs_in_virtual_time(app):
    cfg, _ = app
    now = [100.0]
    slave = TwinSlave(Twin(cfg.twin), cfg.fieldbus.points, comm_watchdog_s=0.5,
                      clock=lambda: now[0])
    assert not any(slave.outputs().values())                     # before the first request
    write = pdu.encode_request(Request(15, 0, 2, (True, True)))
    assert slave.handle(3, write) == bytes((15, 0, 0, 0, 2))
    assert slave.outputs()["heater_tank_bottom"] and slave.outputs()["heater_tank_wall"]
    now[0] += 0.4
    slave.handle(1, pdu.encode_request(Request(4, 0, 1)))         # any request feeds it
    now[0] += 0.4
    assert slave.outputs()["heater_tank_bottom"]
    now[0] += 0.11
    assert not any(slave.outputs().values())
    # a read alone does not bring the old outputs back: only a new write does
    reply = slave.handle(3, pdu.encode_request(Request(1, 0, 2)))
    assert pdu.decode_response(Request(1, 0, 2), reply) == (False, False)
    assert not any(slave.outputs().values())
    assert slave.served == {1: 1, 2: 0, 3: 2}


async def test_comm_watchdog_in_real_time_over_tcp(twin_slave, client):
    twin_slave.comm_watchdog_s = 0.2
    assert not (await client.write_coil(8, True, device_id=3)).isError()
    assert twin_slave.outputs()["vib_heater"]
    await asyncio.sleep(0.3)
    assert not any(twin_slave.outputs().values())


async def test_only_the_master_feeds_the_watchdog_over_tcp(twin_slave, client, app):
    """A connection that only reads (a SCADA, a test watching the outputs) does not keep the
    outputs of a master that has gone silent alive."""
    from pymodbus.client import AsyncModbusTcpClient

    twin_slave.comm_watchdog_s = 0.3
    assert not (await client.write_coil(8, True, device_id=3)).isError()   # client: the master
    observer = AsyncModbusTcpClient("127.0.0.1", port=twin_slave.tcp_port)
    await observer.connect()
    try:
        for _ in range(8):                                   # 0.4 s of reads, master silent
            assert (await observer.read_coils(8, count=1, device_id=3)).bits[0] is twin_slave.outputs()["vib_heater"]
            await asyncio.sleep(0.05)
        assert not any(twin_slave.outputs().values())
    finally:
        observer.close()


async def test_run_steps_the_twin_in_real_time_with_the_outputs(twin_slave, client):
    assert not (await client.write_coil(0, True, device_id=3)).isError()
    twin_slave.comm_watchdog_s = 5.0
    stop = asyncio.Event()
    task = asyncio.create_task(twin_slave.run(stop, step_s=0.02))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 1.0)
    assert 0.2 <= twin_slave.twin.time_s <= 1.0
    assert twin_slave.twin.read_inputs()["current_total"] > 0     # the heater draws current
    r = await client.read_input_registers(10, count=2, device_id=2)
    assert client.convert_from_registers(r.registers, client.DATATYPE.FLOAT32, word_order="little") \
        == pytest.approx(twin_slave.twin.read_inputs()["current_total"], rel=1e-6)


# -- the command ---------------------------------------------------------------------------

async def test_tempering_twin_serves_tcp_and_rtu_until_sigterm(free_port, pty_pair):
    master, slave_dev = pty_pair
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "tempering"), "twin", "--tcp", f"127.0.0.1:{port}", "--rtu", slave_dev,
        "--parity", "none", "--initial-temp-c", "45", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert f"127.0.0.1:{port}" in line and slave_dev in line, \
            line + (await proc.stderr.read()).decode()
        c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0, reconnect_delay=0)
        await c.connect()
        r = await c.read_input_registers(0, count=4, device_id=1)
        c.close()
        assert all(440 <= x <= 460 for x in r.registers), r.registers
        rc, out = await mbpoll("-m", "rtu", "-P", "none", "-a", "1", "-t", "3", "-r", "0", master)
        assert rc == 0 and 440 <= int(polled(out)[0]) <= 460, out
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_tempering_twin_without_a_register_map_says_so(tmp_path):
    src = (ROOT / "config" / "tempering-machine.yaml").read_text()
    if "\nfieldbus:" not in src:
        pytest.fail("the default machine file has no fieldbus section")
    start = src.index("\nfieldbus:")
    end = re.search(r"\n\S", src[start + 1:])
    bare = src[:start] + (src[start + 1 + end.start():] if end else "\n")
    (tmp_path / "m.yaml").write_text(bare)
    (tmp_path / "recipes.yaml").write_text((ROOT / "config" / "recipes.yaml").read_text())
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "tempering"), "twin", "--config", str(tmp_path / "m.yaml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == 2 and "no fieldbus register map" in err.decode(), err.decode()
