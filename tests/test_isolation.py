"""The PLC keeps its scan whatever the plant window does: two processes under one command.

- The PLC process never imports an OPC UA, SQL or InfluxDB library.
- kill -9 of the PLC: the machine's outputs go off (the twin's I/O module, read back with
  pymodbus), the supervisor restarts the PLC, which comes back interrupted; the window reports
  the PLC lost meanwhile; Ctrl-C still ends everything with the outputs safe.
- kill -9 of the window: the PLC goes on scanning and raises plc.window; the supervisor restarts
  the window, which reconnects; an OPC UA client reads Good values again.

Real processes (``tempering run``: supervisor, twin, PLC, window) on free loopback ports in a
temporary directory (``runs.TemperingRun``), ended by PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from runs import TemperingRun, machine_dir, stopped, twin_outputs

HEATERS = ("heater_tank_bottom", "heater_tank_wall", "heater_pump", "heater_fountain")


def test_the_plc_process_imports_no_opcua_sql_or_influx(tmp_path):
    """A PLC process that has run (links, scan, bridge, state) has none of them in sys.modules."""
    config = machine_dir(tmp_path)
    code = (
        "import sys\n"
        "from tempering.cli import main\n"
        f"rc = main(['plc', '--config', {str(config)!r}, '--plant', 'inprocess', '--socket', "
        f"{str(tmp_path / 'plc.sock')!r}, '--duration-s', '1.5', '--priority', 'none'])\n"
        "libraries = ('asyncua', 'sqlalchemy', 'influxdb_client', 'psycopg', 'aiosqlite', 'cryptography', "
        "'matplotlib')\n"
        "window = ('opcua_server.server', 'opcua_server.gate', 'opcua_server.records', "
        "'opcua_server.security', 'historian.service', 'historian.sinks', 'historian.spool')\n"
        "banned = sorted(m for m in sys.modules if m.split('.')[0] in libraries or m in window)\n"
        "print('BANNED', banned)\n"
        "sys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "plc stopped:" in p.stdout and "outputs safe (all off)" in p.stdout
    assert "BANNED []" in p.stdout, p.stdout


def test_a_restarted_plc_knows_the_recipe_book_the_window_last_sent(tmp_path):
    """A batch of a recipe added over OPC UA (in the records, not in recipes.yaml) comes back
    interrupted after a PLC restart, not lost: the PLC keeps the window's last book."""
    import json

    import yaml

    config = machine_dir(tmp_path)
    book = yaml.safe_load((config.parent / "recipes.yaml").read_text())["recipes"]
    ruby = dict(book["dark-70"], name="Ruby 47", heating_goal=45.0, cooling_goal=27.0,
                pouring_goal=30.0, working_max=32.0)
    kept = tmp_path / "plc-state.recipes.json"
    kept.write_text(json.dumps(book | {"ruby-47": ruby}))

    def restart_with_a_ruby_batch() -> str:
        (tmp_path / "plc-state.json").write_text(json.dumps(
            {"version": 1, "phase": "heating", "recipe_id": "ruby-47",
             "batch_id": "tempering-01-000007", "batch_seq": 7}))
        p = subprocess.run([sys.executable, "-m", "tempering.cli", "plc", "--config", str(config),
                            "--plant", "inprocess", "--socket", str(tmp_path / "plc.sock"),
                            "--duration-s", "1", "--priority", "none"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    out = restart_with_a_ruby_batch()
    assert "phase heating (interrupted: resume or abort)" in out, out
    kept.unlink()                                           # without it: the batch is lost
    out = restart_with_a_ruby_batch()
    assert ": phase stopped" in out, out


def _until(predicate, timeout_s: float, step_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"not within {timeout_s:g} s")


def _heating(run: TemperingRun) -> dict[str, bool]:
    outputs = twin_outputs(*run.modbus)
    return outputs if any(outputs[h] for h in HEATERS) else {}


def test_kill_9_of_the_plc_makes_the_outputs_safe_and_it_comes_back_interrupted(tmp_path):
    config = machine_dir(tmp_path)
    with TemperingRun(config, "--initial-temp-c", "45", "--no-opcua") as run:
        plc_pid = run.pid("plc")
        run.wait_for(r"auto-start: StartRecipe dark-70: accepted", 90)
        _until(lambda: _heating(run), 30)                     # the machine heats
        kept = tmp_path / "plc-state.recipes.json"           # the window's book, kept by the PLC
        _until(lambda: kept.exists() and "dark-70" in kept.read_text(), 10)
        mark = len(run.lines)
        os.kill(plc_pid, signal.SIGKILL)
        killed = time.monotonic()
        _until(lambda: not any(twin_outputs(*run.modbus).values()), 10, 0.02)
        off_after_s = time.monotonic() - killed
        run.wait_for(rf"supervisor: plc \(pid {plc_pid}\) ended: killed by SIGKILL; restarting",
                     after=mark)
        new_pid = run.pid("plc", after=mark)
        assert new_pid != plc_pid
        run.wait_for(r"plc: pid \d+.*phase heating \(interrupted: resume or abort\)", 30, after=mark)
        # the restarted PLC keeps the outputs off: an interrupted batch waits for the operator
        time.sleep(1.5)
        assert not any(twin_outputs(*run.modbus).values())
        code = run.stop()
    assert code == 0, run.output
    assert "outputs safe (all off)" in run.output
    assert off_after_s < 5.0, off_after_s     # the figure itself: bench/isolation.py


def test_a_hung_plc_is_killed_and_restarted_by_the_supervisor(tmp_path):
    """SIGSTOP: the PLC neither scans nor answers, its threads included (the machine's own
    watchdog is what remains); the supervisor sees its heartbeat stop, kills and restarts it."""
    config = machine_dir(tmp_path)
    with TemperingRun(config, "--initial-temp-c", "45", "--no-opcua", "--plc-hang-s", "2") as run:
        plc_pid = run.pid("plc")
        run.wait_for(r"auto-start: StartRecipe dark-70: accepted", 90)
        _until(lambda: _heating(run), 30)
        mark = len(run.lines)
        with stopped(plc_pid):
            _until(lambda: not any(twin_outputs(*run.modbus).values()), 10, 0.1)
            run.wait_for(rf"supervisor: plc \(pid {plc_pid}\) hung: no heartbeat for [\d.]+ s; killing it",
                         15, after=mark)
        run.pid("plc", after=mark)
        run.wait_for(r"plc: pid \d+.*phase heating \(interrupted: resume or abort\)", 30, after=mark)
        assert run.stop() == 0, run.output


def test_kill_9_of_the_window_the_plc_keeps_scanning_and_clients_come_back(tmp_path, opcua_pki):
    from asyncua import ua

    config = machine_dir(tmp_path, endpoint=opcua_pki.settings.endpoint,
                         data_dir=opcua_pki.settings.data_dir)
    scan_log = tmp_path / "scans.bin"
    with TemperingRun(config, "--initial-temp-c", "45", "--scan-log", str(scan_log)) as run:
        window_pid = run.pid("window")
        run.wait_for(r"opc ua: serving", 90)
        run.wait_for(r"auto-start: StartRecipe dark-70: accepted", 60)

        async def read_pump_temperature():
            async with await opcua_pki.client("viewer") as client:
                ns = await client.get_namespace_index("urn:open-tempering:machine:tempering-01")
                node = client.get_node(ua.NodeId("Machine.Zones.Pump.Temperature", ns))
                return await node.read_data_value(raise_on_bad_status=False)

        async def good_again(timeout_s: float) -> float:
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout_s:
                try:
                    dv = await read_pump_temperature()
                    if dv.StatusCode.is_good():
                        return time.monotonic() - t0
                except (OSError, asyncio.TimeoutError, ua.UaError, ConnectionError):
                    pass
                await asyncio.sleep(0.2)
            raise AssertionError(f"no Good read within {timeout_s:g} s:\n{run.output[-4000:]}")

        asyncio.run(good_again(30))

        async def scheduling() -> str:
            async with await opcua_pki.client("viewer") as client:
                ns = await client.get_namespace_index("urn:open-tempering:machine:tempering-01")
                return await client.get_node(ua.NodeId("Machine.Diagnostics.Scan.Scheduling", ns)).read_value()
        got = run.wait_for(r"plc: pid \d+, scan 100 ms, scheduling (.+); plant").group(1)
        assert asyncio.run(scheduling()) == got          # what the PLC got, in the diagnostics
        mark = len(run.lines)
        size_before = scan_log.stat().st_size
        os.kill(window_pid, signal.SIGKILL)
        time.sleep(4.0)                                      # the window is gone or restarting
        assert scan_log.stat().st_size > size_before         # the PLC goes on scanning
        run.wait_for(rf"supervisor: window \(pid {window_pid}\) ended: killed by SIGKILL; restarting",
                     after=mark)
        asyncio.run(good_again(60))
        # the restarted window got the plc.window alarm the PLC raised while it was away
        run.wait_for(r"alarm: plc\.window: normal -> unacknowledged_active", 30, after=mark)
        code = run.stop()
    assert code == 0, run.output


def test_a_hung_window_is_replaced_and_the_plc_says_so(tmp_path):
    """SIGSTOP of the window: the PLC hears nothing more from it and raises plc.window; the
    supervisor kills it after --window-hang-s and starts another, which gets the alarm."""
    config = machine_dir(tmp_path)
    with TemperingRun(config, "--no-start", "--no-opcua", "--window-hang-s", "3",
                      "--window-lost-s", "1") as run:
        window_pid = run.pid("window")
        run.wait_for(r"history: ", 60)
        time.sleep(1.0)
        mark = len(run.lines)
        with stopped(window_pid):
            run.wait_for(rf"supervisor: window \(pid {window_pid}\) hung: no heartbeat for [\d.]+ s; "
                         r"killing it", 20, after=mark)
        run.pid("window", after=mark)
        run.wait_for(r"alarm: plc\.window: normal -> unacknowledged_active: Plant window lost: "
                     r"plant window silent for", 30, after=mark)
        assert run.stop() == 0, run.output
