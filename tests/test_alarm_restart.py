"""Alarm states survive a kill -9 of the PLC: an unacknowledged alarm stays unacknowledged, an
acknowledged one keeps who acknowledged it and the comment, and the restart itself is a row of
the alarm journal. Real processes (``tempering run``) on free loopback ports, an asyncua client
over SignAndEncrypt, the journal read with ``tempering alarms journal --json``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

from asyncua import ua

from runs import BIN, TemperingRun, machine_dir

O = ua.ObjectIds
URI = "urn:open-tempering:machine:tempering-01"


async def _read(client, ident: str):
    ns = await client.get_namespace_index(URI)
    return await client.get_node(ua.NodeId(ident, ns)).read_value()


async def _until(coro_fn, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = await coro_fn()
            if value:
                return value
        except (OSError, asyncio.TimeoutError, ua.UaError, ConnectionError):
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {timeout_s:g} s")


def test_a_kill_9_of_the_plc_keeps_alarm_states_and_the_journal_records_the_restart(tmp_path, opcua_pki):
    config = machine_dir(tmp_path, endpoint=opcua_pki.settings.endpoint,
                         data_dir=opcua_pki.settings.data_dir)
    # chocolate above every zone's 60 degC limit: each zone's over-temperature alarm is active
    with TemperingRun(config, "--initial-temp-c", "62", "--no-start") as run:
        run.wait_for(r"opc ua: serving", 90)
        pump, bottom = "Machine.Alarms.zone.pump.over_temp", "Machine.Alarms.zone.tank_bottom.over_temp"

        async def before_the_kill():
            async with await opcua_pki.client("operator") as op:
                await _until(lambda: _read(op, f"{pump}.ActiveState.Id"), 30)
                await _until(lambda: _read(op, f"{bottom}.ActiveState.Id"), 30)
                ns = await op.get_namespace_index(URI)
                event_id = await _read(op, f"{bottom}.EventId")
                await op.get_node(ua.NodeId(bottom, ns)).call_method(
                    ua.NodeId(O.AcknowledgeableConditionType_Acknowledge),
                    ua.Variant(event_id, ua.VariantType.ByteString), ua.LocalizedText("hot charge, known"))
                await _until(lambda: _read(op, f"{bottom}.AckedState.Id"), 10)
                return await _read(op, f"{pump}.AckedState.Id")

        assert asyncio.run(before_the_kill()) is False
        plc_pid = run.pid("plc")
        mark = len(run.lines)
        time.sleep(1.0)                       # the state file written (its writer runs every scan)
        os.kill(plc_pid, signal.SIGKILL)
        run.wait_for(rf"supervisor: plc \(pid {plc_pid}\) ended: killed by SIGKILL; restarting", after=mark)
        run.pid("plc", after=mark)

        async def after_the_restart():
            async with await opcua_pki.client("viewer") as viewer:
                await _until(lambda: _read(viewer, "Machine.Diagnostics.Scan.Scans"), 30)
                await asyncio.sleep(2.0)          # a few publications of the restarted PLC
                return {"pump_acked": await _read(viewer, f"{pump}.AckedState.Id"),
                        "bottom_acked": await _read(viewer, f"{bottom}.AckedState.Id"),
                        "bottom_user": await _read(viewer, f"{bottom}.ClientUserId"),
                        "bottom_comment": await _read(viewer, f"{bottom}.Comment")}

        after = asyncio.run(after_the_restart())
        assert after["pump_acked"] is False                        # still waiting for an operator
        assert after["bottom_acked"] is True and after["bottom_user"] == "operator"
        assert after["bottom_comment"].Text == "hot charge, known"
        journal = subprocess.run([str(BIN / "tempering"), "alarms", "journal", "--config", str(config), "--json"],
                                 capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert journal.returncode == 0, journal.stderr
        rows = [json.loads(line) for line in journal.stdout.splitlines() if line.strip()]
        assert sum(1 for r in rows if r["kind"] == "restart") >= 2      # the first start and the restart
        acked = [r for r in rows if r["alarm_id"] == "zone.tank_bottom.over_temp" and r["kind"] == "acknowledged"]
        assert acked and acked[0]["user"] == "operator" and acked[0]["comment"] == "hot charge, known"
        assert run.stop() == 0, run.output
