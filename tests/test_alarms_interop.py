"""The machine's alarms through a Part 9 client of another stack: node-opcua's alarm and
condition helpers (``tests/js/alarms.js``, run with node as a subprocess) against a real
TemperingServer of a PLC scanning in real time on the in-process twin, on loopback, over
SignAndEncrypt Basic256Sha256 with user names and passwords.

The script subscribes as an operator to the events of the Server object with a Part 9 event
filter and refreshes, then says "ready"; the test raises the pump's temperature over its limit;
the script sees the condition active, has a viewer's Acknowledge refused, acknowledges it with a
comment through node-opcua's alarm display, has the stale EventId refused, then says
"acknowledged"; the test cools the pump; the script sees the condition return to normal and
leave Retain; a technician shelves and unshelves another condition. The records' alarm journal,
fed from the PLC's alarm events by the window's journal task, holds every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from machines import InProcessMachine
from test_opcua_interop import TOOLS, _tools_or_fail, js_certificate

SCRIPT = Path(__file__).resolve().parent / "js" / "alarms.js"
ALARM, SHELVE = "zone.pump.over_temp", "zone.fountain.over_temp"
COMMENT = "hot charge, cooling down"
STEP_TIMEOUT_S = 60.0


async def run_script(args: dict, on_step: dict) -> dict:
    """Run alarms.js with ``args``; call ``on_step[step]()`` for each progress line; return the
    last line (the script's result)."""
    node = _tools_or_fail()
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), json.dumps({"tools": str(TOOLS), **args}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    err = bytearray()

    async def drain_stderr():               # node-opcua logs there; a full pipe would stall it
        while chunk := await proc.stderr.read(65536):
            err.extend(chunk)
    stderr_task = asyncio.create_task(drain_stderr())
    steps, last = [], {}
    try:
        while True:
            raw = await asyncio.wait_for(proc.stdout.readline(), STEP_TIMEOUT_S)
            if not raw:
                break
            last = json.loads(raw)
            steps.append(last.get("step"))
            if last.get("step") in on_step:
                on_step[last["step"]]()
            if last.get("step") == "done" or last.get("ok") is False:
                break
        await asyncio.wait_for(proc.wait(), 20.0)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stderr_task, 5.0)
    last["_steps"] = steps
    last["_stderr"] = err.decode(errors="replace")[-3000:]
    return last


async def test_node_opcua_alarm_display_acknowledge_return_to_normal_shelve(opcua_pki, tmp_path):
    _tools_or_fail()
    async with InProcessMachine(opcua_pki, seed=3, initial_temp_c=40.0) as m:
        pki_dir = tmp_path / "node-opcua-pki"
        assert opcua_pki.pki.trust(await js_certificate(pki_dir)).state == "trusted"
        r = await run_script(
            dict(pki=str(pki_dir), endpoint=m.endpoint, serverCertificate=m.server_certificate,
                 passwords={role: opcua_pki.password(role) for role in ("technician", "operator", "viewer")},
                 alarm=ALARM, shelve=SHELVE, comment=COMMENT, shelveMs=60_000.0),
            {"ready": lambda: m.twin.set_temperature("pump", 63.0),
             "acknowledged": lambda: m.twin.set_temperature("pump", 40.0)})
        assert r.get("ok"), (f"{r.get('stage')}: {r.get('error')}\n"
                             f"{ {k: v for k, v in r.items() if k != '_stderr'} }\n{r['_stderr']}")
        assert r["_steps"] == ["ready", "acknowledged", "done"], r["_steps"]
        condition = m.nodes.conditions[ALARM].nodeid.to_string()
        shelved_condition = m.nodes.conditions[SHELVE].nodeid.to_string()
        alarm_type = m.server.conditions.conditions[ALARM].type_id.to_string()
        trips = set(m.controller.state.trips)

    # ConditionRefresh: Good, the start and end markers around the retained conditions
    first = r["firstRefresh"]
    assert first["status"] == "Good" and first["markers"] == ["RefreshStart", "RefreshEnd"], first
    assert ALARM not in first["conditions"]

    # active: an event of the condition's type through OfType AlarmConditionType, retained
    a = r["active"]
    assert a["ConditionId"] == condition and a["SourceName"] == "Pump"
    assert a["ActiveState.Id"] is True and a["ActiveState"] == "Active"
    assert a["Retain"] is True and a["AckedState.Id"] is False and a["AckedState"] == "Unacknowledged"
    assert a["Severity"] == 900 and "over-temperature" in a["Message"]
    assert a["EventType"] == alarm_type                     # TemperatureLevelAlarmType
    assert a["ShelvingState.CurrentState"] == "Unshelved" and a["EnabledState.Id"] is True
    assert ALARM in trips                                   # the trip latched in the PLC
    # refreshed while active: the condition's last event again, the same EventId
    again = r["activeRefresh"]
    assert again["status"] == "Good" and again["markers"] == ["RefreshStart", "RefreshEnd"], again
    assert again["eventIds"][again["conditions"].index(ALARM)] == a["EventId"]
    # node-opcua's alarm display (installAlarmMonitoring: OfType AcknowledgeableConditionType)
    d = r["displayActive"]
    assert d == {"retain": True, "activeState": True, "ackedState": False, "severity": 900,
                 "eventType": a["EventType"], "count": d["count"]} and d["count"] >= 1, d

    # acknowledge: a viewer is refused, the operator's (last EventId, comment) accepted
    assert r["viewerAcknowledge"] == "BadUserAccessDenied"
    assert r["acknowledge"] == "Good"
    k = r["acked"]
    assert k["AckedState.Id"] is True and k["ActiveState.Id"] is True and k["Retain"] is True
    assert k["Comment"] == COMMENT and k["ClientUserId"] == "operator"
    assert k["EventId"] != a["EventId"]
    assert r["ackedInDisplay"] == {"comment": COMMENT, "clientUserId": "operator"}
    # the activation's EventId is not the condition's last any more
    assert r["staleAcknowledge"] == "BadEventIdUnknown"

    # cleared: back to normal, acknowledged, no longer retained; out of the alarm display
    n = r["normal"]
    assert n["ActiveState.Id"] is False and n["AckedState.Id"] is True and n["Retain"] is False
    assert ALARM in r["removedFromDisplay"] and ALARM not in r["displayAfter"]
    # a later refresh does not send it
    last = r["lastRefresh"]
    assert last["status"] == "Good" and last["markers"] == ["RefreshStart", "RefreshEnd"]
    assert ALARM not in last["conditions"]

    # shelving is the technician's: an operator is refused
    assert r["operatorShelve"] == "BadUserAccessDenied"
    assert r["timedShelve"] == "Good" and r["unshelve"] == "Good"
    s, u = r["shelved"], r["unshelved"]
    assert s["ConditionId"] == shelved_condition and s["ShelvingState.LastTransition"] == "UnshelvedToTimedShelved"
    assert s["SuppressedOrShelved"] is True and 0 < s["ShelvingState.UnshelveTime"] <= 60_000.0
    assert s["ClientUserId"] == "technician" and s["Retain"] is False
    assert u["ShelvingState.LastTransition"] == "TimedShelvedToUnshelved" and u["SuppressedOrShelved"] is False
    assert r["unshelveAgain"] == "BadConditionNotShelved"
    # the operator's subscription saw them too (the Server object gets every condition event)
    assert [e["ShelvingState.CurrentState"] for e in r["operatorEvents"] if e["ConditionName"] == SHELVE] \
        == ["TimedShelved", "Unshelved"]

    # every event of the alarm on the operator's subscription, in order, one EventId each (the
    # refresh while it was active sent the activation again: same EventId, same fields)
    mine = [e for e in r["operatorEvents"] if e["ConditionName"] == ALARM]
    assert mine[0] == mine[1] and len({e["EventId"] for e in mine}) == len(mine) - 1
    states = [(e["ActiveState.Id"], e["AckedState.Id"], e["Retain"]) for e in mine[1:]]
    assert states == [(True, False, True), (True, True, True), (False, True, False)], states

    # the alarm journal (written by the window's journal task; its last batch when the machine
    # stopped) holds every step, with the EventIds the client saw
    rows = opcua_pki.records.alarm_journal(alarm_id=ALARM)
    assert [row.kind for row in rows] == ["active", "acknowledged", "cleared"], rows
    active, acked, cleared = rows
    assert active.active and not active.acked and active.event_id == a["EventId"]
    assert active.state == "unacknowledged_active" and active.severity == 900
    assert (acked.user, acked.comment, acked.acked, acked.event_id) == ("operator", COMMENT, True, k["EventId"])
    assert not cleared.active and cleared.acked and cleared.state == "normal" and cleared.event_id == n["EventId"]
    rows = opcua_pki.records.alarm_journal(alarm_id=SHELVE)
    assert [(row.kind, row.user, row.shelving) for row in rows] == [
        ("shelved", "technician", "timed"), ("unshelved", "technician", "unshelved")], rows
    assert [row.event_id for row in rows] == [s["EventId"], u["EventId"]]
