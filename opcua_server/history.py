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

The same class answers from InfluxDB: ``store`` is then an ``opcua_server.history_influx.
InfluxHistory`` (same ``read_raw``), so bounds, reverse order and continuation points are this
module's (``page``) whatever the backend. A start later than the end reads newest first (Part 11
§6.4.3.2), both bounds still inclusive; the continuation point is then the next older value.

StatusCodes of a zone's HistoryRead (per node once ``answer_per_node`` is installed on the
server's history manager, else as the service result)
    Good, values            what the store holds in the range (none: Good with no values,
                            the store's answer for a zone without data in that range)
    Bad_DataUnavailable     the store cannot answer now: InfluxDB unreachable, timed out
                            (``timeout_s`` of the store), HTTP 5xx/401/403/404, or the local
                            store's database error (Part 11 §6.2.2 Table 25: "an off-line
                            historical collection, or similar reason for temporary
                            unavailability"). Not Bad_NoData: that would claim the range is
                            empty, which nobody knows. Not Bad_CommunicationError: Part 4 uses it
                            for the client's own link to this server.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from datetime import datetime, timedelta, timezone

from asyncua import ua
from asyncua.server.history import HistoryStorageInterface

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: Rows read at most when the request sets no NumValuesPerNode.
MAX_VALUES = 1_000_000
#: Added to a store's own ``timeout_s``: the hard limit on one read, so a read never hangs.
TIMEOUT_MARGIN_S = 0.5


class HistoryUnavailable(Exception):
    """The store cannot answer now (network, timeout, server error, credentials): the node's
    answer is Bad_DataUnavailable. The message never carries a credential."""


def _ns(t: datetime | None, default_ns: int) -> int:
    if t is None or t <= datetime(1601, 1, 2, tzinfo=timezone.utc).replace(tzinfo=t.tzinfo):
        return default_ns
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return (t - _EPOCH) // timedelta(microseconds=1) * 1000


def _time(ts_ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ts_ns // 1000)


def bounds(start: datetime | None, end: datetime | None, now_ns: int) -> tuple[int, int, bool]:
    """``(lo_ns, hi_ns, newest_first)`` of a raw read, ``[lo_ns, hi_ns)``: both bounds of the
    request inclusive; no start is the beginning, no end is now; a start after the end reads the
    same range newest first (Part 11 §6.4.3.2)."""
    start_ns, end_ns = _ns(start, 0), _ns(end, -1)
    if end_ns < 0:
        return start_ns, now_ns + 1, False
    if start_ns > end_ns:
        return end_ns, start_ns + 1, True
    return start_ns, end_ns + 1, False


def page(rows: list, nb_values: int) -> tuple[list, datetime | None]:
    """``rows`` (``(ts_ns, value)``, in the order of the answer, read with a limit of
    ``nb_values + 1``) cut to ``nb_values`` (0: no limit), and the continuation point: the time
    of the first value left out (asyncua's stateless continuation: the next request starts
    there), None when nothing is left."""
    if nb_values and len(rows) > nb_values:
        return rows[:nb_values], _time(rows[nb_values][0])
    return rows, None


def answer_per_node(server) -> None:
    """Make the asyncua ``server``'s HistoryRead answer a store's failure as that node's
    StatusCode (Part 4 §5.10.3: operation-level results) instead of failing the whole request:
    the other nodes of the request keep their values."""
    manager = server.iserver.history_manager
    read_one = manager._read_history

    async def _read_history(details, rv):
        try:
            return await read_one(details, rv)
        except ua.UaStatusCodeError as e:
            result = ua.HistoryReadResult()
            result.StatusCode = ua.StatusCode(e.code)
            return result
    manager._read_history = _read_history


class LocalHistory(HistoryStorageInterface):
    """``store`` None: no value history; ``events(source, start, end, nb_values, filter)``
    answers event history, None: none."""

    def __init__(self, store, zones_by_node: dict[ua.NodeId, str], machine_id: str, events=None):
        super().__init__()
        self.store = store
        self.zones = zones_by_node
        self.machine_id = machine_id
        self.events = events
        self._name = getattr(store, "name", type(store).__name__)
        self._failed = False

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
        lo_ns, hi_ns, newest_first = bounds(start, end, time.time_ns())
        limit = nb_values + 1 if nb_values else MAX_VALUES
        rows = await self._read(zone, lo_ns, hi_ns, limit, newest_first)
        rows, cont = page(rows, nb_values)
        now = datetime.now(timezone.utc)
        return [ua.DataValue(ua.Variant(float(v), ua.VariantType.Double),
                             SourceTimestamp=_time(t), ServerTimestamp=now) for t, v in rows], cont

    async def _read(self, zone: str, lo_ns: int, hi_ns: int, limit: int, newest_first: bool):
        """The store's rows, on a thread, within the store's ``timeout_s`` (+ margin); a store
        that cannot answer is Bad_DataUnavailable (logged once per outage)."""
        args = ("zone", "temp_c", {"zone": zone, "machine": self.machine_id}, lo_ns, hi_ns)
        timeout_s = getattr(self.store, "timeout_s", None)
        try:
            if newest_first and "newest_first" in inspect.signature(self.store.read_raw).parameters:
                call = asyncio.to_thread(self.store.read_raw, *args, limit, newest_first=True)
            elif newest_first:       # a store that reads oldest first only: the newest of all
                call = asyncio.to_thread(lambda: self.store.read_raw(*args, MAX_VALUES)[::-1][:limit])
            else:
                call = asyncio.to_thread(self.store.read_raw, *args, limit)
            rows = await asyncio.wait_for(call, None if timeout_s is None
                                          else timeout_s + TIMEOUT_MARGIN_S)
        except Exception as e:   # noqa: BLE001  (HistoryUnavailable, a timeout, sqlite3.Error)
            self._failing(e)
            raise ua.UaStatusCodeError(ua.StatusCodes.BadDataUnavailable) from None
        if self._failed:
            log.warning("history: %s answers again", self._name)
            self._failed = False
        return rows

    def _failing(self, e: BaseException) -> None:
        text = str(e) or type(e).__name__
        if not self._failed:
            log.warning("history: %s cannot answer (%s): HistoryRead gives Bad_DataUnavailable",
                        self._name, text)
        self._failed = True

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
