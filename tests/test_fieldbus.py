"""The PLC's Modbus links against the twin served as a real Modbus slave (TCP on loopback, RTU
over a pty pair made by socat), in real time: qualities, fault handling, reconnect, demotion.

The faults are injected on the twin's Modbus face (``TwinSlave.faults``); what is checked is
what the PLC sees (``read_inputs``), what it does (the scan's outputs) and what reaches the
machine (the outputs the twin's I/O module holds).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from opcua_server.config import load
from plc.commands import Reset, StartRecipe
from plc.image import Quality
from plc.modbus.io import ModbusPlantIo
from plc.program import Program
from plc.runtime import Controller, MonotonicClock, Runtime, WatchdogSettings
from twin import Twin
from twin.modbus_slave import TwinSlave

TEMPS = ("temp_tank_bottom", "temp_tank_wall", "temp_pump", "temp_fountain")
METER = ("grid_v_l1", "grid_v_l2", "grid_v_l3", "grid_freq", "current_total")
HEATERS = ("heater_tank_bottom", "heater_tank_wall", "heater_pump", "heater_fountain")


@pytest.fixture(scope="module")
def app():
    return load()


def fieldbus_on(cfg, port: int | None = None, device: str | None = None, **link_settings):
    """The config's fieldbus with its one link moved to ``port`` (TCP) or ``device`` (RTU)."""
    fb = cfg.fieldbus
    name, link = next(iter(fb.links.items()))
    if device is not None:
        from plc.modbus.regmap import RtuLink
        data = {k: v for k, v in link.model_dump().items() if k not in ("transport", "host", "port")}
        link = RtuLink(transport="rtu", device=device, baud_rate=115200, **data)
    else:
        link = link.model_copy(update={"port": port})
    if link_settings:
        link = link.model_copy(update=link_settings)
    return fb.model_copy(update={"links": {name: link}})


async def until(predicate, timeout_s: float, step_s: float = 0.005) -> float:
    """Wait until ``predicate()`` is true; the time it took (fails the test on timeout)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(step_s)
    return time.monotonic() - t0


@dataclass
class Plc:
    """The PLC (runtime + Modbus I/O) and the twin's slave, all in this event loop."""

    io: ModbusPlantIo
    slave: TwinSlave
    controller: Controller | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list = field(default_factory=list)
    scans: list = field(default_factory=list)   # (monotonic time, ScanResult)

    def inputs(self):
        return self.io.read_inputs()

    def quality(self, names):
        img = self.inputs()
        return {img[n].quality for n in names}

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.slave.close()


async def start(cfg, book=None, *, run_plc: bool = False, slave_port: int = 0,
                fieldbus=None, mixer_delay_s: float = 1.0, initial_temp_c: float = 40.0) -> Plc:
    twin = Twin(cfg.twin, seed=1, initial_temp_c=initial_temp_c)
    slave = TwinSlave(twin, cfg.fieldbus.points)
    await slave.start_tcp("127.0.0.1", slave_port)
    slave.update_inputs()
    io = ModbusPlantIo(fieldbus or fieldbus_on(cfg, slave.tcp_port))
    plc = Plc(io, slave)
    plc.tasks.append(asyncio.create_task(slave.run(plc.stop)))
    plc.tasks.append(asyncio.create_task(io.run(plc.stop)))
    if run_plc:
        mc = cfg.machine_config.model_copy(update={"mixer_delay": mixer_delay_s})
        program = Program.from_config(cfg.model_copy(update={"machine_config": mc}), book,
                                      period_s=0.1)
        plc.controller = Controller(program)
        rt = Runtime(plc.controller, io, MonotonicClock(), WatchdogSettings(5, 10.0),
                     after_scan=lambda r: plc.scans.append((time.monotonic(), r)))
        plc.tasks.append(asyncio.create_task(rt.run(plc.stop)))
    return plc


async def test_tcp_inputs_good_and_equal_to_the_machine(app):
    cfg, _ = app
    plc = await start(cfg)
    try:
        await until(lambda: plc.quality(plc.inputs().keys()) == {Quality.GOOD}, 2.0)
        img = plc.inputs()
        truth = plc.slave.twin.read_inputs()
        for n in TEMPS:
            assert img[n].value == pytest.approx(truth[n], abs=0.051), n
        for n in METER:
            assert img[n].value == pytest.approx(truth[n], abs=0.5), n
        assert img["estop_ok"].value is True and img["pedal"].value is False
        assert img["temp_pump"].timestamp_s == pytest.approx(time.time(), abs=1.0)
        await until(lambda: plc.io.diagnostics()[0].polls >= 3, 1.0)
        d = plc.io.diagnostics()[0]     # outputs unchanged, refresh not due yet: the 4 reads
        assert d.state == "connected" and d.requests_per_poll == 4
        assert {dev.state for dev in d.devices} == {"connected"}
        assert sum(d.errors.values()) == 0 and d.rtt_ms_p50 > 0
    finally:
        await plc.close()


async def test_outputs_written_on_change_and_every_mapping_kind(app):
    cfg, _ = app
    plc = await start(cfg)
    try:
        await until(lambda: plc.io.diagnostics()[0].polls > 2, 2.0)
        for name in plc.io.outputs:    # one at a time: coils, packed bits, single coil/register
            want = {n: n == name for n in plc.io.outputs}
            plc.io.output_slot.put(want)
            took = await until(lambda: plc.slave.outputs() == want, 1.0)
            assert took < 0.2, (name, took)
        plc.io.force_safe()
        await until(lambda: not any(plc.slave.outputs().values()), 1.0)
    finally:
        await plc.close()


async def test_silent_unit_bad_within_0_6_s_others_keep_polling(app):
    cfg, _ = app
    plc = await start(cfg)
    try:
        await until(lambda: plc.quality(TEMPS) == {Quality.GOOD}, 2.0)
        plc.slave.faults.silent_units.add(1)
        took = await until(lambda: plc.quality(TEMPS) == {Quality.BAD}, 2.0, step_s=0.002)
        assert took <= 0.6
        reason = plc.inputs()["temp_pump"].reason
        assert "communication error: no reply from unit 1 within 250 ms" in reason
        # the meter (unit 2) and the digital I/O (unit 3) stay good and fresh meanwhile
        for _ in range(20):
            assert plc.quality(METER + ("estop_ok",)) == {Quality.GOOD}
            await asyncio.sleep(0.05)
        dev = {d.unit: d for d in plc.io.diagnostics()[0].devices}
        assert dev[1].errors["timeout"] >= 2 and dev[2].errors["timeout"] == 0
        plc.slave.faults.clear()
        await until(lambda: plc.quality(TEMPS) == {Quality.GOOD}, 5.0)
    finally:
        await plc.close()


async def test_exception_on_one_block_does_not_stop_the_others(app):
    cfg, _ = app
    plc = await start(cfg)
    try:
        await until(lambda: plc.quality(plc.inputs().keys()) == {Quality.GOOD}, 2.0)
        plc.slave.faults.exceptions.append((2, 4, 0, 19, 2))   # the power meter's block
        await until(lambda: plc.quality(METER) == {Quality.BAD}, 1.0)
        reason = plc.inputs()["grid_v_l1"].reason
        assert "exception code 2 (illegal data address)" in reason and "unit 2" in reason
        before = plc.io.diagnostics()[0].polls
        await until(lambda: plc.io.diagnostics()[0].polls >= before + 5, 2.0)
        assert plc.quality(TEMPS + ("estop_ok", "pedal")) == {Quality.GOOD}
        dev = {d.unit: d for d in plc.io.diagnostics()[0].devices}
        assert dev[2].state == "connected"          # it answers: not demoted
        assert dev[2].errors["exception"] >= 5 and dev[2].errors["timeout"] == 0
    finally:
        await plc.close()


async def test_garbage_reply_is_bad_quality_with_the_reason(app):
    cfg, _ = app
    plc = await start(cfg)
    try:
        await until(lambda: plc.quality(TEMPS) == {Quality.GOOD}, 2.0)
        plc.slave.faults.garbage_units.add(1)
        await until(lambda: plc.quality(TEMPS) == {Quality.BAD}, 2.0)
        d = plc.io.diagnostics()[0]
        assert d.errors["garbage"] + d.errors["disconnect"] >= 1
        assert "communication error" in plc.inputs()["temp_pump"].reason
        plc.slave.faults.clear()
        await until(lambda: plc.quality(TEMPS) == {Quality.GOOD}, 5.0)
    finally:
        await plc.close()


async def test_stale_value_turns_uncertain(app):
    cfg, _ = app
    now = [100.0]
    io = ModbusPlantIo(fieldbus_on(cfg, 1), clock=lambda: now[0])   # never connected
    assert io.read_inputs()["temp_pump"].quality is Quality.BAD
    io.inputs.good("temp_pump", 31.5, 1.7e9, now[0])
    assert io.read_inputs()["temp_pump"].quality is Quality.GOOD
    now[0] += 1.001
    p = io.read_inputs()["temp_pump"]
    assert p.quality is Quality.UNCERTAIN and p.value == 31.5 and p.reason.startswith("stale")


async def test_silent_temperature_module_trips_heaters_in_one_scan_no_restart_without_reset(app):
    cfg, book = app
    plc = await start(cfg, book, run_plc=True)
    try:
        plc.controller.submit(StartRecipe(cfg.machine.default_recipe, user="test"))
        await until(lambda: plc.slave.outputs()["heater_tank_bottom"], 10.0, step_s=0.02)
        plc.slave.faults.silent_units.add(1)
        t_silent = time.monotonic()
        took = await until(lambda: plc.quality(TEMPS) == {Quality.BAD}, 2.0, step_s=0.002)
        assert took <= 0.6
        # the first scan that saw the bad temperatures switched every heater off
        await asyncio.sleep(0.15)      # the scan that follows
        first_bad = next(r for t, r in plc.scans if t >= t_silent
                         and any(z.quality is Quality.BAD for z in r.zones))
        assert not any(first_bad.outputs[h].value for h in HEATERS)
        await until(lambda: not any(plc.slave.outputs()[h] for h in HEATERS), 0.3)
        # the device comes back: good again, but the heaters stay off until a reset
        plc.slave.faults.clear()
        t_back = time.monotonic()
        await until(lambda: plc.quality(TEMPS) == {Quality.GOOD}, 5.0)
        assert time.monotonic() - t_back < 5.0
        await asyncio.sleep(1.0)
        assert not any(plc.slave.outputs()[h] for h in HEATERS)
        plc.controller.submit(Reset(user="test"))     # a reset never restarts heating by itself
        await asyncio.sleep(1.0)
        assert not any(plc.slave.outputs()[h] for h in HEATERS)
        plc.controller.submit(StartRecipe(cfg.machine.default_recipe, user="test"))
        await until(lambda: plc.slave.outputs()["heater_tank_bottom"], 10.0, step_s=0.02)
    finally:
        await plc.close()


async def test_slave_gone_link_down_then_reconnect_within_5_s(app, free_port):
    cfg, _ = app
    port = free_port()
    plc = await start(cfg, slave_port=port)
    try:
        await until(lambda: plc.quality(TEMPS) == {Quality.GOOD}, 2.0)
        await plc.slave.close()
        await until(lambda: plc.quality(plc.inputs().keys()) == {Quality.BAD}, 1.0)
        assert "down" in plc.inputs()["temp_pump"].reason
        await asyncio.sleep(3.0)       # backoff grows to its 2 s cap meanwhile
        assert plc.io.diagnostics()[0].state == "down"
        await plc.slave.start_tcp("127.0.0.1", port)
        took = await until(lambda: plc.quality(plc.inputs().keys()) == {Quality.GOOD}, 5.0)
        assert took < 5.0
        d = plc.io.diagnostics()[0]
        assert d.reconnects >= 1 and d.errors["disconnect"] >= 1 and d.state == "connected"
    finally:
        await plc.close()


async def test_dropped_connection_reconnects(app):
    cfg, _ = app
    plc = await start(cfg)
    try:
        await until(lambda: plc.quality(TEMPS) == {Quality.GOOD}, 2.0)
        plc.slave.faults.drop_connections()
        await until(lambda: plc.io.diagnostics()[0].reconnects >= 1, 3.0)
        await until(lambda: plc.quality(plc.inputs().keys()) == {Quality.GOOD}, 3.0)
    finally:
        await plc.close()


async def test_rtu_over_pty_and_a_silent_unit_is_demoted(app, pty_pair):
    cfg, _ = app
    master, slave_dev = pty_pair
    twin = Twin(cfg.twin, seed=1, initial_temp_c=40.0)
    slave = TwinSlave(twin, cfg.fieldbus.points)
    await slave.start_rtu(slave_dev, 115200, "even", 1)
    slave.update_inputs()
    io = ModbusPlantIo(fieldbus_on(cfg, device=master))
    plc = Plc(io, slave)
    plc.tasks += [asyncio.create_task(slave.run(plc.stop)), asyncio.create_task(io.run(plc.stop))]
    try:
        await until(lambda: plc.quality(plc.inputs().keys()) == {Quality.GOOD}, 3.0)
        truth = twin.read_inputs()
        assert plc.inputs()["temp_pump"].value == pytest.approx(truth["temp_pump"], abs=0.051)
        io.output_slot.put({n: n == "heater_pump" for n in io.outputs})
        await until(lambda: slave.outputs()["heater_pump"], 1.0)
        slave.faults.silent_units.add(2)        # the power meter stops answering on the bus
        await until(lambda: {d.unit: d.state for d in io.diagnostics()[0].devices}[2] == "demoted",
                    5.0)
        # demoted: the others are polled at full rate again (no 2 x 250 ms per poll)
        ages = []
        for _ in range(40):
            await asyncio.sleep(0.05)
            ages.append(time.monotonic() - io.inputs.read_at["temp_pump"])
        assert max(ages) < 0.3, max(ages)
        assert plc.quality(METER) == {Quality.BAD}
        slave.faults.clear()
        await until(lambda: plc.quality(METER) == {Quality.GOOD}, 4.0)
        assert {d.unit: d.state for d in io.diagnostics()[0].devices}[2] == "connected"
    finally:
        await plc.close()


def test_plc_and_twin_as_two_processes(tmp_path, free_port):
    """`tempering twin` in one process, `tempering run --plant modbus` in another, over TCP;
    mbpoll checks afterwards that the PLC left every output off on the machine."""
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    for f in ("tempering-machine.yaml", "recipes.yaml", "register-map.yaml"):
        shutil.copy(root / "config" / f, tmp_path / f)
    machine = tmp_path / "tempering-machine.yaml"
    machine.write_text(re.sub(r"port: 5020", f"port: {port}", machine.read_text()))
    bin_dir = Path(sys.executable).parent
    twin = subprocess.Popen([bin_dir / "tempering", "twin", "--config", machine,
                             "--initial-temp-c", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening" in twin.stdout.readline()
        run = subprocess.run([bin_dir / "tempering", "run", "--plant", "modbus", "--config", machine,
                              "--duration-s", "15", "--state-file", tmp_path / "state.json", "--no-opcua"],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "phase: idle -> heating" in run.stdout
        assert "trip" not in run.stdout, run.stdout
        assert "outputs safe (all off)" in run.stdout
        coils = subprocess.run(["mbpoll", "-m", "tcp", "-p", str(port), "-a", "3", "-t", "0", "-r", "1",
                                "-c", "6", "-0", "-1", "-o", "1", "127.0.0.1"],
                               capture_output=True, text=True, timeout=20)
        assert coils.returncode == 0, coils.stdout + coils.stderr
        values = re.findall(r"^\[\d+\]:\s+(\d+)", coils.stdout, re.M)
        assert values == ["0"] * 6, coils.stdout
    finally:
        twin.terminate()
        twin.wait(timeout=10)
