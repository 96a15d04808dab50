"""HistoryRead: zone temperatures from the historian's local store, events from the alarm journal.

One job: answer OPC UA Part 11 ReadRawModifiedDetails for the ``Temperature`` variable of each
zone from ``historian.local.LocalStore`` (what ``make run`` records with no InfluxDB), and
ReadEventDetails on the machine object (or the Server object, or one alarm source) from the
records' alarm journal (``events``: ``opcua_server.conditions.ConditionServer.history``), every
row a condition event with the fields it had, filtered by the request's where clause. The
server does not historize by itself: the historian is the one writer of the history, so the
server's history and the historian's can never disagree. Start and end are inclusive; with
``NumValuesPerNode`` the answer stops there and the continuation point is the time of the next
value (asyncua's stateless continuation). Values before ``retention_days`` are gone.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from asyncua import ua
from asyncua.server.history import HistoryStorageInterface

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _ns(t: datetime | None, default_ns: int) -> int:
    if t is None or t <= datetime(1601, 1, 2, tzinfo=timezone.utc).replace(tzinfo=t.tzinfo):
        return default_ns
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int((t - _EPOCH).total_seconds() * 1e9)


class LocalHistory(HistoryStorageInterface):
    """``store`` None: no value history; ``events(source, start, end, nb_values, filter)``
    answers event history, None: none."""

    def __init__(self, store, zones_by_node: dict[ua.NodeId, str], machine_id: str, events=None):
        super().__init__()
        self.store = store
        self.zones = zones_by_node
        self.machine_id = machine_id
        self.events = events

    async def init(self) -> None:
        return None

    async def new_historized_node(self, node_id, period, count=0) -> None:
        return None

    async def save_node_value(self, node_id, datavalue) -> None:
        return None

    async def read_node_history(self, node_id, start, end, nb_values):
        zone = self.zones.get(node_id)
        if zone is None or self.store is None:
            return [], None
        start_ns = _ns(start, 0)
        end_ns = _ns(end, int(time.time() * 1e9)) + 1
        limit = nb_values + 1 if nb_values else 1_000_000
        rows = await asyncio.to_thread(self.store.read_raw, "zone", "temp_c",
                                       {"zone": zone, "machine": self.machine_id}, start_ns, end_ns,
                                       limit)
        cont = None
        if nb_values and len(rows) > nb_values:
            cont = datetime.fromtimestamp(rows[nb_values][0] / 1e9, timezone.utc)
            rows = rows[:nb_values]
        now = datetime.now(timezone.utc)
        return [ua.DataValue(ua.Variant(float(v), ua.VariantType.Double),
                             SourceTimestamp=datetime.fromtimestamp(t / 1e9, timezone.utc),
                             ServerTimestamp=now) for t, v in rows], cont

    async def new_historized_event(self, source_id, evtypes, period, count=0) -> None:
        return None

    async def save_event(self, event) -> None:
        return None

    async def read_event_history(self, source_id, start, end, nb_values, evfilter):
        if self.events is None:
            return [], None
        return await self.events(source_id, start, end, nb_values, evfilter)

    async def stop(self) -> None:
        return None
