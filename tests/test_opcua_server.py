"""The OPC UA server of a running PLC, through a real asyncua client over SignAndEncrypt:
values with units and status, subscriptions, writes (good and refused), methods, recipes
that survive a restart, alarms and their events, the audit trail, diagnostics."""

from __future__ import annotations

import asyncio
import time

import pytest
from asyncua import ua

from machines import InProcessMachine, until


class Machine(InProcessMachine):
    """PLC (real time, 100 ms) on the in-process twin, and the OPC UA server, over the bridge."""

    def __init__(self, opcua_pki, book=None):
        super().__init__(opcua_pki, seed=2, initial_temp_c=40.0)




def client_node(client, server_node):
    return client.get_node(server_node.nodeid)


async def status_of_write(node, value, vtype):
    try:
        await node.write_value(ua.DataValue(ua.Variant(value, vtype)))
    except ua.UaStatusCodeError as e:
        return type(e).__name__
    return "Good"


async def status_of_call(obj, method, *args):
    try:
        await obj.call_method(method, *args)
    except ua.UaStatusCodeError as e:
        return type(e).__name__
    return "Good"


async def test_values_units_status_and_subscription(opcua_pki):
    async with Machine(opcua_pki) as m:
        client = await opcua_pki.client("viewer")
        async with client:
            temp = client_node(client, m.nodes.zones["pump"]["Temperature"])
            dv = await temp.read_data_value()
            assert dv.StatusCode.is_good() and 35.0 < dv.Value.Value < 45.0
            assert abs(dv.SourceTimestamp.timestamp() - time.time()) < 2.0
            eu = await (await temp.get_child("0:EngineeringUnits")).read_value()
            assert eu.UnitId == 4408652 and eu.DisplayName.Text in ("°C", "degC")
            rng = await (await temp.get_child("0:EURange")).read_value()
            assert rng.Low <= 0.0 < 60.0 <= rng.High
            assert (await temp.read_description()).Text
            # every process-image point is published
            for name, node in m.nodes.points.items():
                assert (await client_node(client, node).read_data_value()).Value is not None, name
            # and what is derived from the outputs: a zone's Heater, a motor's Running
            for node in [z["Heater"] for z in m.nodes.zones.values()] + \
                        [mo["Running"] for mo in m.nodes.motors.values()]:
                dv = await client_node(client, node).read_data_value()
                assert dv.StatusCode.is_good() and isinstance(dv.Value.Value, bool)

            changes = []

            class Handler:
                def datachange_notification(self, node, val, data):
                    changes.append(val)

            sub = await client.create_subscription(100, Handler())
            await sub.subscribe_data_change(client_node(client, m.nodes.diagnostics["Scan.Scans"]))
            await until(lambda: len(changes) >= 3)
            assert changes[-1] > changes[0]


async def test_writes_checked_by_role_type_range_state_and_audited(opcua_pki):
    async with Machine(opcua_pki) as m:
        z = m.nodes.zones["pump"]
        async with await opcua_pki.client("technician") as tech:
            trim = client_node(tech, z["Trim"])
            assert await status_of_write(trim, 1.5, ua.VariantType.Double) == "Good"
            await until(lambda: m.controller.state.trims.get("pump") == 1.5)
            assert await status_of_write(trim, 5.0, ua.VariantType.Double) == "BadOutOfRange"
            assert await status_of_write(trim, "1", ua.VariantType.String) == "BadTypeMismatch"
            manual = client_node(tech, z["ManualOutput"])
            assert await status_of_write(manual, 10.0, ua.VariantType.Double) == "BadInvalidState"
            assert await status_of_write(client_node(tech, z["Mode"]), "manual",
                                         ua.VariantType.String) == "Good"
            await until(lambda: "pump" in m.controller.state.manual)
            assert await status_of_write(manual, 12.5, ua.VariantType.Double) == "Good"
            await until(lambda: m.controller.state.manual.get("pump") == 12.5)
            assert await status_of_write(client_node(tech, z["Kp"]), 60.0, ua.VariantType.Double) == "Good"
            await until(lambda: m.controller.state.tuning.get("pump", {}).get("kp") == 60.0)
            assert await status_of_write(client_node(tech, m.nodes.zones["pump"]["Temperature"]), 1.0,
                                         ua.VariantType.Double) in ("BadNotWritable", "BadUserAccessDenied")
        async with await opcua_pki.client("viewer") as viewer:
            assert await status_of_write(client_node(viewer, z["Trim"]), 0.5,
                                         ua.VariantType.Double) == "BadUserAccessDenied"
        assert m.controller.state.trims.get("pump") == 1.5           # nothing refused was applied
        audit = m.records.audit_entries(50)
        results = [(a["user"], a["target"], a["result"].split(":")[0]) for a in audit]
        assert ("technician", "pump.Trim", "Good") in results
        assert ("technician", "pump.Trim", "BadOutOfRange") in results
        assert ("viewer", "pump.Trim", "BadUserAccessDenied") in results


async def test_methods_by_role_with_status_codes(opcua_pki):
    async with Machine(opcua_pki) as m:
        seq = m.nodes.sequencer
        async with await opcua_pki.client("viewer") as viewer:
            parent = client_node(viewer, m.nodes.machine)
            assert await status_of_call(parent, client_node(viewer, m.nodes.methods["StartRecipe"]),
                                        ua.Variant("dark-70", ua.VariantType.String)) == "BadUserAccessDenied"
        async with await opcua_pki.client("operator") as op:
            method_parent = client_node(op, (await m.server.server.get_node(
                m.nodes.methods["StartRecipe"].nodeid).get_parent()))
            start = client_node(op, m.nodes.methods["StartRecipe"])
            assert await status_of_call(method_parent, start,
                                        ua.Variant("no-such", ua.VariantType.String)) == "BadInvalidState"
            assert await status_of_call(method_parent, start,
                                        ua.Variant("dark-70", ua.VariantType.String)) == "Good"
            await until(lambda: m.controller.state.phase.value == "heating")
            phase = client_node(op, seq["Phase"])
            await until(lambda: phase.read_value())       # 1 = heating
            assert await status_of_call(method_parent, start,
                                        ua.Variant("dark-70", ua.VariantType.String)) == "BadInvalidState"
            hold = client_node(op, m.nodes.methods["Hold"])
            assert await status_of_call(method_parent, hold) == "Good"
            await until(lambda: m.controller.state.held)
            abort = client_node(op, m.nodes.methods["Abort"])
            assert await status_of_call(method_parent, abort) == "Good"
            await until(lambda: m.controller.state.phase.value == "stopped")
        calls = [(a["user"], a["target"], a["result"].split(":")[0]) for a in m.records.audit_entries(50)]
        assert ("operator", "StartRecipe", "BadInvalidState") in calls
        assert ("viewer", "StartRecipe", "BadUserAccessDenied") in calls


async def test_recipes_edited_over_opcua_survive_a_restart(opcua_pki):
    async with Machine(opcua_pki) as m:
        methods = m.nodes.methods
        async with await opcua_pki.client("admin") as admin:
            book = client_node(admin, m.nodes.recipes_folder)
            d = ua.VariantType.Double
            s = ua.VariantType.String
            ok = await status_of_call(book, client_node(admin, methods["AddRecipe"]),
                                      ua.Variant("ruby-47", s), ua.Variant("Ruby 47", s),
                                      ua.Variant(45.0, d), ua.Variant(27.0, d), ua.Variant(30.0, d),
                                      ua.Variant(32.0, d))
            assert ok == "Good"
            bad = await status_of_call(book, client_node(admin, methods["AddRecipe"]),
                                       ua.Variant("bad-1", s), ua.Variant("Bad", s),
                                       ua.Variant(45.0, d), ua.Variant(27.0, d), ua.Variant(50.0, d),
                                       ua.Variant(52.0, d))
            assert bad == "BadOutOfRange"                       # pouring above heating
            assert "ruby-47" in m.nodes.recipes and "bad-1" not in m.nodes.recipes
            pour = client_node(admin, m.nodes.recipes["ruby-47"]["PouringGoal"])
            assert await pour.read_value() == 30.0
            assert await status_of_write(pour, 29.5, d) == "Good"
            assert await status_of_write(pour, 44.0, d) == "BadOutOfRange"   # above working max
            dup = await status_of_call(book, client_node(admin, methods["DuplicateRecipe"]),
                                       ua.Variant("ruby-47", s), ua.Variant("ruby-48", s),
                                       ua.Variant("Ruby 48", s))
            assert dup == "Good"
            assert await status_of_call(book, client_node(admin, methods["DeleteRecipe"]),
                                        ua.Variant("ruby-48", s)) == "Good"
        async with await opcua_pki.client("operator") as op:
            book = client_node(op, m.nodes.recipes_folder)
            assert await status_of_call(book, client_node(op, methods["DeleteRecipe"]),
                                        ua.Variant("ruby-47", s)) == "BadUserAccessDenied"
        assert "ruby-47" in m.controller.program.recipes
    # a new server on the same records: the edited recipe is back, the deleted one gone
    async with Machine(opcua_pki) as m2:
        assert m2.server.book["ruby-47"].pouring_goal == 29.5
        assert "ruby-48" not in m2.server.book
        async with await opcua_pki.client("viewer") as viewer:
            pour = client_node(viewer, m2.nodes.recipes["ruby-47"]["PouringGoal"])
            assert await pour.read_value() == 29.5


async def test_alarm_condition_and_event_on_a_sensor_fault(opcua_pki):
    async with Machine(opcua_pki) as m:
        events = []

        class Handler:
            def event_notification(self, event):
                events.append(event)

        async with await opcua_pki.client("operator") as op:
            sub = await op.create_subscription(100, Handler())
            await sub.subscribe_events(client_node(op, m.nodes.machine), ua.ObjectIds.OffNormalAlarmType)
            m.twin.set_sensor_fault("pump", "open")
            cond = m.nodes.conditions["zone.pump.sensor"].nodeid
            active = op.get_node(ua.NodeId(f"{cond.Identifier}.ActiveState.Id", cond.NamespaceIndex))
            await until(lambda: active.read_value(), 5.0)
            temp = await client_node(op, m.nodes.zones["pump"]["Temperature"]).read_data_value(raise_on_bad_status=False)
            assert temp.StatusCode.is_bad()
            count = client_node(op, m.nodes.alarms_summary["ActiveCount"])
            await until(lambda: count.read_value(), 5.0)
            await until(lambda: any(getattr(e, "SourceName", "") == "Pump" and "sensor" in e.Message.Text
                                    for e in events))
            e = next(e for e in events if "sensor" in e.Message.Text)
            prio = int(m.controller.state.alarms["zone.pump.sensor"].priority)
            assert e.Severity == prio
            assert e.EventType == ua.NodeId(1015, m.nodes.types_namespace_index)   # MachineOffNormalAlarmType


async def test_history_read_of_zone_temperatures_from_the_local_store(opcua_pki, tmp_path):
    """What the historian recorded (local store, the default) read back over OPC UA HistoryRead."""
    from datetime import datetime, timedelta, timezone

    from historian.local import LocalStore
    from historian.schema import line

    store = LocalStore(tmp_path / "history.sqlite")
    t0 = float(int(time.time()) - 100)
    from opcua_server.config import load
    machine_id = load()[0].machine.id
    store.write_lines([line("zone", {"machine": machine_id, "zone": "pump", "phase": "pouring",
                                     "batch": "b", "recipe": "dark-70"},
                            {"temp_c": 31.0 + i / 10, "output_pct": 1.0}, int((t0 + i) * 1e9))
                       for i in range(50)] +
                      [line("zone", {"machine": machine_id, "zone": "fountain", "phase": "pouring",
                                     "batch": "b", "recipe": "dark-70"},
                            {"temp_c": 99.0}, int(t0 * 1e9))])
    m = Machine(opcua_pki)
    m.server.history_store = store
    async with m:
        async with await opcua_pki.client("viewer") as viewer:
            temp = client_node(viewer, m.nodes.zones["pump"]["Temperature"])
            assert await temp.read_attribute(ua.AttributeIds.Historizing)
            start = datetime.fromtimestamp(t0 + 10, timezone.utc)
            end = datetime.fromtimestamp(t0 + 19, timezone.utc)
            values = await temp.read_raw_history(start, end)
            assert [round(v.Value.Value, 2) for v in values] == [round(31.0 + i / 10, 2) for i in range(10, 20)]
            assert values[0].SourceTimestamp == start
            everything = await temp.read_raw_history(start - timedelta(seconds=100), datetime.now(timezone.utc))
            assert len(everything) == 50 and all(v.Value.Value < 40 for v in everything)
    store.close()


async def test_a_refused_start_returns_the_scans_verdict_to_the_client_and_the_audit(opcua_pki):
    """The gate does not guess: StartRecipe while a batch runs goes to the scan, which refuses
    it; the client gets BadInvalidState and the audit row the scan's own reason, linked to the
    command's id (the same id the scan's verdict event carries)."""
    async with Machine(opcua_pki) as m:
        refusals = m.plc.channel.subscribe(maxlen=4096)
        async with await opcua_pki.client("operator") as op:
            events = []

            class Handler:
                def event_notification(self, event):
                    events.append(event)
            sub = await op.create_subscription(100, Handler())
            await sub.subscribe_events(client_node(op, m.nodes.machine),
                                       ua.ObjectIds.AuditUpdateMethodEventType)
            parent = client_node(op, await m.server.server.get_node(
                m.nodes.methods["StartRecipe"].nodeid).get_parent())
            start = client_node(op, m.nodes.methods["StartRecipe"])
            dark = ua.Variant("dark-70", ua.VariantType.String)
            assert await status_of_call(parent, start, dark) == "Good"
            assert await status_of_call(parent, start, dark) == "BadInvalidState"
            # the client learns why: the audit event carries the scan's reason
            await until(lambda: any(e.Status is False for e in events))
            told = next(e for e in events if e.Status is False)
            assert told.Message.Text == ("StartRecipe by operator: BadInvalidState: a batch is "
                                         "heating; stop or abort it first")
            assert told.ClientUserId == "operator"
        rows = [a for a in m.records.audit_entries(50) if a["target"] == "StartRecipe"]
        refused = next(a for a in rows if a["result"].startswith("BadInvalidState"))
        assert refused["result"] == "BadInvalidState: a batch is heating; stop or abort it first"
        assert refused["origin"] == "opcua" and refused["command_id"] == told.ClientAuditEntryId
        accepted = next(a for a in rows if a["result"] == "Good")
        assert accepted["command_id"] and accepted["command_id"] != refused["command_id"]
        events = [e for s in refusals.drain() for e in s.events if e.kind == "command_refused"]
        assert any(dict(e.data)["command_id"] == refused["command_id"] for e in events)


async def test_plc_lost_makes_every_process_value_bad_and_commands_fail_plainly(opcua_pki):
    """The PLC stops sending (its process is gone): the window shows Bad, not stale Good; a
    command is answered BadNoCommunication at once; the PLC's own side sees the window go."""
    async with Machine(opcua_pki) as m:
        async with await opcua_pki.client("operator") as op:
            temp = client_node(op, m.nodes.zones["pump"]["Temperature"])
            assert (await temp.read_data_value()).StatusCode.is_good()
            m.plc_stop.set()                  # the scan ends: no more snapshots
            await m.port.close()              # and the PLC's end of the link goes
            await until(lambda: m.plc.status() != "")

            async def bad():
                return (await temp.read_data_value(raise_on_bad_status=False)).StatusCode.value == ua.StatusCodes.BadNoCommunication
            await until(bad, 5.0)
            parent = client_node(op, await m.server.server.get_node(
                m.nodes.methods["Hold"].nodeid).get_parent())
            assert await status_of_call(parent, client_node(op, m.nodes.methods["Hold"])) == "BadNoCommunication"
        await until(lambda: m.port.status().startswith("plant window disconnected"))
