"""``io.sever(reason)``: the hang watchdog's path to the machine while the PLC's event loop hangs.

Real sockets on loopback and a real pty pair (socat). The twin's slave runs in the test's event
loop with a 30 s communication watchdog (so it is not the slave's own watchdog that drops the
outputs); the PLC's links run in an event loop of their own, in a thread, which the test blocks
with a ``time.sleep`` scheduled on it, as a hung scan would. ``sever`` is called from a third
thread. What is checked is what reaches the machine (the outputs the slave holds), what the
diagnostics say, and that the links serve again once the loop runs.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from opcua_server.config import load
from plc.image import Point, ProcessImage, Quality
from plc.modbus.io import ModbusPlantIo
from plc.contract import MOTORS, OUTPUT_SPECS
from test_fieldbus import fieldbus_on, until
from twin import Twin
from twin.inprocess import InProcessTwinIo
from twin.modbus_slave import TwinSlave

HEATERS = ("heater_tank_bottom", "heater_tank_wall", "heater_pump", "heater_fountain")
ON = frozenset((*HEATERS, *MOTORS, "vib_heater", "mold_heater"))   # a write of each function


@pytest.fixture(scope="module")
def app():
    return load()


def image(on) -> ProcessImage:
    return ProcessImage.build(OUTPUT_SPECS, {n: Point(n in on) for n in OUTPUT_SPECS})


class PlcLoop:
    """The PLC's links in an event loop of their own, in a thread, that the test can hang."""

    def __init__(self, io: ModbusPlantIo):
        self.io = io
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="plc-loop", daemon=True)
        self.thread.start()
        self.stop: asyncio.Event | None = None
        self.task = asyncio.run_coroutine_threadsafe(self._run(), self.loop)

    async def _run(self) -> None:
        self.stop = asyncio.Event()
        await self.io.run(self.stop)

    def hang(self, seconds: float) -> threading.Event:
        """Block the loop for ``seconds`` (a scan stuck in a computation); set once blocked."""
        hung = threading.Event()

        def block() -> None:
            hung.set()
            time.sleep(seconds)
        self.loop.call_soon_threadsafe(block)
        return hung

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        try:
            self.task.result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
            self.loop.close()


async def start_slave(cfg):
    slave = TwinSlave(Twin(cfg.twin, seed=1, initial_temp_c=40.0), cfg.fieldbus.points,
                      comm_watchdog_s=30.0)
    stop = asyncio.Event()
    task = asyncio.create_task(slave.run(stop))

    async def close() -> None:
        stop.set()
        await task
        await slave.close()
    return slave, close


async def sever_while_hung(plc: PlcLoop, slave: TwinSlave, hang_s: float = 2.0) -> float:
    """Hang the PLC's loop, then sever from another thread; how long ``sever`` took."""
    assert plc.hang(hang_s).wait(1.0)
    t0 = time.monotonic()
    await asyncio.to_thread(plc.io.sever, "test")      # the slave keeps serving meanwhile
    return time.monotonic() - t0


async def test_tcp_sever_writes_safe_and_closes_while_the_loop_hangs(app):
    cfg, _ = app
    slave, close_slave = await start_slave(cfg)
    await slave.start_tcp("127.0.0.1", 0)
    io = ModbusPlantIo(fieldbus_on(cfg, slave.tcp_port))
    plc = PlcLoop(io)
    try:
        io.write_outputs(image(ON))                     # from this thread: the slot wakes the links
        await until(lambda: {n for n, v in slave.outputs().items() if v} == ON, 2.0)
        assert io.diagnostics()[0].state == "connected" and slave.tcp_clients == 1
        served = slave.served[3]

        took = await sever_while_hung(plc, slave)
        assert took < 0.5, took
        await until(lambda: slave.tcp_clients == 0, 0.5 - took)   # both connections ended
        assert not any(slave.outputs().values())        # written by sever, not by a watchdog
        assert slave.served[3] - served == 4             # the 4 write requests (FC 15, 16, 5, 6)
        d = io.diagnostics()[0]
        assert d.severs == 1 and d.state == "severed", d
        assert "safe outputs written: 4 of 4 requests" in d.last_sever, d.last_sever
        assert "live connection shut down" in d.last_sever
        assert d.last_sever_wall == pytest.approx(time.time(), abs=2.0)
        assert io.outputs == {n: False for n in OUTPUT_SPECS}

        # the loop runs again: the link meets the closed connection and reconnects by itself
        await until(lambda: io.diagnostics()[0].reconnects == 1, 4.0)
        await until(lambda: io.diagnostics()[0].state == "connected", 1.0)
        d = io.diagnostics()[0]
        assert d.errors["disconnect"] >= 1 and "connection severed: test" in d.last_error
        polls = d.polls
        await until(lambda: io.diagnostics()[0].polls >= polls + 3, 1.0)
        assert {p.quality for p in io.read_inputs().values()} == {Quality.GOOD}
        # the image of the scan that hung does not switch the outputs back on; a safe image
        # (the trip the next scan latches) ends the hold, then outputs go out as before
        io.write_outputs(image(ON))
        assert io.outputs == {n: False for n in OUTPUT_SPECS} and io.held_safe == "test"
        io.write_outputs(image(()))
        assert io.held_safe == ""
        io.write_outputs(image({"heater_pump"}))
        await until(lambda: slave.outputs()["heater_pump"], 1.0)
        assert slave.tcp_clients == 1
    finally:
        await asyncio.to_thread(plc.close)
        await close_slave()


def test_sever_of_an_unreachable_device_returns_within_its_timeout(app, free_port):
    cfg, _ = app
    io = ModbusPlantIo(fieldbus_on(cfg, free_port()))   # nobody listens; links never started
    t0 = time.monotonic()
    io.sever("nobody there")
    assert time.monotonic() - t0 < 0.3
    d = io.diagnostics()[0]
    assert d.severs == 1 and "0 of 4 requests" in d.last_sever, d.last_sever
    assert "refused" in d.last_sever.lower() and "no live connection" in d.last_sever


def test_sever_of_a_device_that_never_answers_returns_within_its_timeout(app):
    cfg, _ = app
    with socket.create_server(("127.0.0.1", 0)) as mute:   # accepts (backlog), never replies
        io = ModbusPlantIo(fieldbus_on(cfg, mute.getsockname()[1]))
        t0 = time.monotonic()
        io.sever("mute", timeout_s=0.2)
        took = time.monotonic() - t0
    assert 0.15 < took < 0.4, took
    d = io.diagnostics()[0]
    assert "0 of 4 requests (no reply from unit 3 within 200 ms)" in d.last_sever, d.last_sever


async def test_rtu_sever_writes_safe_on_the_port_while_the_loop_hangs(app, pty_pair):
    cfg, _ = app
    master, slave_dev = pty_pair
    slave, close_slave = await start_slave(cfg)
    await slave.start_rtu(slave_dev, 115200, "even", 1)
    io = ModbusPlantIo(fieldbus_on(cfg, device=master))
    plc = PlcLoop(io)
    try:
        io.write_outputs(image(ON))
        await until(lambda: {n for n, v in slave.outputs().items() if v} == ON, 3.0)
        served = slave.served[3]

        took = await sever_while_hung(plc, slave)
        assert took < 0.5, took
        assert not any(slave.outputs().values())
        assert slave.served[3] - served == 4
        d = io.diagnostics()[0]
        assert d.severs == 1 and "4 of 4 requests" in d.last_sever, d.last_sever
        assert "serial line left open" in d.last_sever

        # the loop runs again: the line is polled as before
        polls = d.polls
        await until(lambda: io.diagnostics()[0].polls >= polls + 3, 4.0)
        await until(lambda: {p.quality for p in io.read_inputs().values()} == {Quality.GOOD}, 2.0)
        io.write_outputs(image(()))
        io.write_outputs(image({"heater_pump"}))
        await until(lambda: slave.outputs()["heater_pump"], 1.0)
    finally:
        await asyncio.to_thread(plc.close)
        await close_slave()


def test_in_process_sever_drops_every_output(app):
    cfg, _ = app
    io = InProcessTwinIo(Twin(cfg.twin, seed=1))
    io.write_outputs(image(ON))
    threading.Thread(target=io.sever, args=("test",)).run()
    assert not any(io.outputs.values()) and io.last_sever == "test"
