"""Batch records in the address space: the batch in progress, the last record, any record.

One job: show what ``opcua_server.batches`` computes (the window's batch recorder) to OPC UA
clients, and nothing else.

    Machine/Batches/Current   the running figures of the batch in progress (``running``)
    Machine/Batches/Last      BatchRecordType: the last batch's record and verdict (``completed``)
    Machine/Batches/GetBatch  (BatchId) -> Record: any stored batch's record as JSON (viewer);
                              an unknown id is BadNotFound, a non-String BadTypeMismatch
    BatchCompletedEventType   one event per record, on the machine and the Server object, with
                              the verdict and its reasons (Severity 100 PASS, 500 INCOMPLETE,
                              700 FAIL)
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Any

from asyncua import ua
from asyncua.common.events import Event

from .gate import Refused
from .model import TYPE_IDS, MachineNodes
from .notifiers import SERVER, notify

_V = ua.VariantType
SEVERITY = {"PASS": 100, "INCOMPLETE": 500, "FAIL": 700}


_UNSET = object()


def _utc(epoch_s: float | None) -> datetime | None:
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, timezone.utc)


def record_values(record: Any) -> dict[str, tuple[Any, ua.VariantType]]:
    """A BatchRecord as the BatchRecordType's variables (browse name -> value, type)."""
    busy = sum(p.duration_s for p in record.phases)
    return {
        "BatchId": (record.batch_id, _V.String), "RecipeId": (record.recipe_id, _V.String),
        "StartedAt": (_utc(record.started_at), _V.DateTime), "EndedAt": (_utc(record.ended_at), _V.DateTime),
        "StartedBy": (record.started_by or "", _V.String), "Outcome": (record.outcome, _V.String),
        "FirstOut": (record.first_out or "", _V.String), "Verdict": (record.verdict, _V.String),
        "Reasons": (list(record.reasons), _V.String), "Duration": (float(busy), _V.Double),
        "Energy": (float(record.energy_kwh or 0.0), _V.Double),
        "EnergyPerKg": (float(record.energy_kwh_per_kg or 0.0), _V.Double),
        "AlarmCount": (len(record.alarms), _V.UInt32),
        "Interruptions": (len(record.interruptions), _V.UInt32),
        "Record": (json.dumps(record.to_dict(), sort_keys=True), _V.String)}


class BatchView:
    """``records``: opcua_server.records.Records (``batch(id)``); ``gate``: the window's Gate
    (role check and audit of GetBatch)."""

    def __init__(self, server, nodes: MachineNodes, records, gate):
        self.server = server
        self.nodes = nodes
        self.records = records
        self.gate = gate
        self.events_sent = 0
        self._written: dict[ua.NodeId, Any] = {}

    def install(self) -> None:
        method = self.nodes.methods.get("GetBatch")
        if method is not None:
            self.server.link_method(method, self.gate.method("GetBatch", "viewer", self._get_batch))

    async def _write(self, prefix: str, values: dict[str, tuple[Any, ua.VariantType]]) -> None:
        """Write the variables whose value changed (a subscriber hears of changes only)."""
        now = datetime.now(timezone.utc)
        for name, (value, vt) in values.items():
            node = self.nodes.batches.get(f"{prefix}.{name}")
            if node is None or self._written.get(node.nodeid, _UNSET) == value:
                continue
            self._written[node.nodeid] = value
            dv = ua.DataValue(ua.Variant(value, vt), SourceTimestamp=now, ServerTimestamp=now)
            if value is None:                      # no time yet: null, Good
                dv = ua.DataValue(SourceTimestamp=now, ServerTimestamp=now)
                dv.Value = None
            await self.server.write_attribute_value(node.nodeid, dv)

    async def idle(self) -> None:
        """Before any batch: Current empty, Last empty (no variable left waiting for data)."""
        await self.running(None)
        await self._write("Last", {
            "BatchId": ("", _V.String), "RecipeId": ("", _V.String), "StartedAt": (None, _V.DateTime),
            "EndedAt": (None, _V.DateTime), "StartedBy": ("", _V.String), "Outcome": ("", _V.String),
            "FirstOut": ("", _V.String), "Verdict": ("", _V.String), "Reasons": ([], _V.String),
            "Duration": (0.0, _V.Double), "Energy": (0.0, _V.Double), "EnergyPerKg": (0.0, _V.Double),
            "AlarmCount": (0, _V.UInt32), "Interruptions": (0, _V.UInt32), "Record": ("", _V.String)})

    async def running(self, current: dict | None, now_s: float | None = None) -> None:
        """The batch in progress (``BatchRecorder.current()``: a dict), or None; ``now_s`` the
        time of the last snapshot, for Elapsed."""
        c = current or {}
        started = c.get("started_at")
        share = (c.get("figures") or {}).get("pouring_in_band_share")
        elapsed = max(0.0, now_s - started) if (now_s is not None and started is not None) else 0.0
        await self._write("Current", {
            "BatchId": (c.get("batch_id") or "", _V.String), "RecipeId": (c.get("recipe_id") or "", _V.String),
            "StartedAt": (_utc(started), _V.DateTime), "Elapsed": (float(elapsed), _V.Double),
            "Energy": (float(c.get("energy_kwh") or 0.0), _V.Double),
            "AlarmCount": (int(c.get("alarms") or 0), _V.UInt32),
            "PouringInBand": (float(share) * 100.0 if share is not None else 0.0, _V.Double)})

    async def completed(self, record: Any) -> None:
        """A batch ended: its record in Last, and a BatchCompletedEventType event."""
        await self._write("Last", record_values(record))
        await self.running(None)
        batches = self.nodes.objects.get("Batches")
        source = batches.nodeid if batches is not None else self.nodes.machine.nodeid
        ev = Event(self.nodes.machine.nodeid)
        put = ev.add_property
        for name, vt in (("EventId", _V.ByteString), ("Time", _V.DateTime), ("ReceiveTime", _V.DateTime),
                         ("LocalTime", _V.ExtensionObject)):
            put(name, None, vt)                    # stamped by notify
        put("EventType", ua.NodeId(TYPE_IDS["BatchCompletedEventType"], self.nodes.types_namespace_index), _V.NodeId)
        put("SourceNode", source, _V.NodeId)
        put("SourceName", "Batches", _V.String)
        put("Message", ua.LocalizedText(
            f"batch {record.batch_id} ({record.recipe_id}) {record.outcome}: {record.verdict}"
            + (f": {'; '.join(record.reasons)}" if record.reasons else ""), "en"), _V.LocalizedText)
        put("Severity", SEVERITY.get(record.verdict, 500), _V.UInt16)
        for name, (value, vt) in record_values(record).items():
            if name in ("BatchId", "RecipeId", "Outcome", "Verdict", "Reasons"):
                put(name, value, vt)
        await notify(self.server, ev, (self.nodes.machine.nodeid, SERVER), when=_utc(record.ended_at))
        self.events_sent += 1

    async def _get_batch(self, user: str, batch_id=None, *extra):
        if not isinstance(batch_id, str):
            raise Refused(ua.StatusCodes.BadTypeMismatch, "GetBatch takes a String BatchId")
        record = await asyncio.to_thread(self.records.batch, batch_id)
        if record is None:
            raise Refused(ua.StatusCodes.BadNotFound, f"no batch {batch_id!r} in the records")
        return [ua.Variant(json.dumps(record.to_dict(), sort_keys=True), _V.String)]
