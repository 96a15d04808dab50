"""HistoryRead of zone temperatures answered from InfluxDB (opcua_server.history_influx).

Samples are written by the historian's real sink (Influx1Sink) into a real InfluxDB 1.x, then
read over OPC UA through the machine's server with ``history_store`` an InfluxHistory, as the
plant window wires it: bounds, NumValuesPerNode with continuation points read to the end,
reverse order, a zone without data, and an InfluxDB that cannot be reached answering
Bad_DataUnavailable within its timeout.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from asyncua import ua

from historian.schema import line
from historian.sinks import Influx1Sink
from machines import InProcessMachine as Machine
from opcua_server.config import load
from opcua_server.history import answer_per_node
from opcua_server.history_influx import InfluxHistory, raw_query, rows_of
from servers import find_free_port

N = 50


def client_node(client, server_node):
    return client.get_node(server_node.nodeid)


def _at(t_s: float) -> datetime:
    return datetime.fromtimestamp(t_s, timezone.utc)


async def _read(node, start, end, nb_values):
    """One HistoryRead (ReadRawModifiedDetails) of one node: (values, continuation, status)."""
    details = ua.ReadRawModifiedDetails(IsReadModified=False, StartTime=start, EndTime=end,
                                        NumValuesPerNode=nb_values, ReturnBounds=False)
    return await _history_read(node, details, None)


async def _history_read(node, details, cont):
    params = ua.HistoryReadParameters(HistoryReadDetails=details,
                                      TimestampsToReturn=ua.TimestampsToReturn.Source,
                                      NodesToRead=[ua.HistoryReadValueId(NodeId=node.nodeid,
                                                                         ContinuationPoint=cont)])
    result = (await node.session.history_read(params))[0]
    values = result.HistoryData.DataValues if result.HistoryData else []
    return values, result.ContinuationPoint, result.StatusCode


async def _read_all(node, start, end, nb_values):
    """Every page of one read, following the continuation points: (values, pages)."""
    details = ua.ReadRawModifiedDetails(IsReadModified=False, StartTime=start, EndTime=end,
                                        NumValuesPerNode=nb_values, ReturnBounds=False)
    values, cont, status = await _history_read(node, details, None)
    assert status.is_good()
    pages = 1
    while cont:
        more, cont, status = await _history_read(node, details, cont)
        assert status.is_good()
        values += more
        pages += 1
    return values, pages


def test_the_query_reads_what_the_sink_writes_pure():
    q = raw_query("zone", "temp_c", {"zone": "it's", "machine": 'a"b'}, 10, 20, 6,
                  retention_policy="autogen", newest_first=True)
    assert q == ('SELECT "temp_c" FROM "autogen"."zone" WHERE "machine" = \'a"b\' AND '
                 "\"zone\" = 'it\\'s' AND time >= 10 AND time < 20 ORDER BY time DESC LIMIT 6")
    answer = {"results": [{"statement_id": 0, "series": [{"name": "zone", "columns": ["time", "temp_c"],
                                                           "values": [[1, 2.5], [2, None]]}]}]}
    assert rows_of(answer) == [(1, 2.5)]
    assert rows_of({"results": [{"statement_id": 0}]}) == []


async def test_history_read_from_influxdb_bounds_pages_reverse_and_an_outage(opcua_pki, influxdb1):
    machine_id = load()[0].machine.id
    t0 = float(int(time.time()) - 200)
    sink = Influx1Sink(influxdb1.url, influxdb1.database)
    # two batches of the pump (two series of one zone), a sensor fault (no temp_c), one fountain point
    sink.write([line("zone", {"machine": machine_id, "zone": "pump", "phase": "pouring",
                              "batch": "b1" if i < 25 else "b2", "recipe": "dark-70"},
                     {"temp_c": 31.0 + i / 10, "output_pct": 1.0}, int((t0 + i) * 1e9))
                for i in range(N)]
               + [line("zone", {"machine": machine_id, "zone": "pump", "phase": "pouring",
                                "batch": "b2", "recipe": "dark-70"},
                       {"output_pct": 0.0, "quality": "bad"}, int((t0 + N) * 1e9)),
                  line("zone", {"machine": "another", "zone": "pump"}, {"temp_c": 99.0},
                       int((t0 + 5) * 1e9) + 1),
                  line("zone", {"machine": machine_id, "zone": "fountain"}, {"temp_c": 99.0},
                       int(t0 * 1e9))])
    sink.close()
    store = InfluxHistory(influxdb1.url, influxdb1.database, timeout_s=2.0)
    m = Machine(opcua_pki, history_store=store)
    async with m:
        answer_per_node(m.server.server)
        async with await opcua_pki.client("viewer") as viewer:
            pump = client_node(viewer, m.nodes.zones["pump"]["Temperature"])
            assert await pump.read_attribute(ua.AttributeIds.Historizing)
            expected = [round(31.0 + i / 10, 2) for i in range(N)]

            # bounds: both inclusive
            values = await pump.read_raw_history(_at(t0 + 10), _at(t0 + 19))
            assert [round(v.Value.Value, 2) for v in values] == expected[10:20]
            assert values[0].SourceTimestamp == _at(t0 + 10)
            assert values[-1].SourceTimestamp == _at(t0 + 19)

            # NumValuesPerNode: pages of 7 with continuation points, to the end, across batches
            values, pages = await _read_all(pump, _at(t0 - 100), _at(t0 + 300), 7)
            assert [round(v.Value.Value, 2) for v in values] == expected
            assert pages == 8
            first, cont, status = await _read(pump, _at(t0), _at(t0 + 300), 7)
            assert status.is_good() and len(first) == 7 and cont    # exactly like LocalHistory

            # reverse order: a start after the end, newest first, pages too
            values, pages = await _read_all(pump, _at(t0 + 29), _at(t0 + 10), 6)
            assert [round(v.Value.Value, 2) for v in values] == expected[10:30][::-1]
            assert pages == 4

            # a zone without data
            tank = client_node(viewer, m.nodes.zones["tank_bottom"]["Temperature"])
            values, cont, status = await _read(tank, _at(t0 - 100), _at(t0 + 300), 0)
            assert status.is_good() and values == [] and not cont

            # InfluxDB cannot be reached: Bad_DataUnavailable for that node, promptly
            m.server.server.iserver.history_manager.storage.store = InfluxHistory(
                f"http://127.0.0.1:{find_free_port()}", "tempering", timeout_s=1.0)
            started = time.monotonic()
            values, cont, status = await _read(pump, _at(t0), _at(t0 + 300), 0)
            assert status.value == ua.StatusCodes.BadDataUnavailable and values == []
            assert time.monotonic() - started < 1.0 + 1.0

            # InfluxDB stopped (the port open a moment ago): the same, then back once it is up
            m.server.server.iserver.history_manager.storage.store = store
            influxdb1.stop()
            started = time.monotonic()
            values, cont, status = await _read(pump, _at(t0), _at(t0 + 300), 0)
            assert status.value == ua.StatusCodes.BadDataUnavailable
            assert time.monotonic() - started < 2.0 + 1.0
            influxdb1.start()
            values, cont, status = await _read(pump, _at(t0), _at(t0 + 300), 0)
            assert status.is_good() and len(values) == N


async def test_a_database_that_never_answers_is_bad_within_the_timeout(opcua_pki):
    """A listening socket that accepts and never answers: the read gives up at timeout_s."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        store = InfluxHistory(f"http://127.0.0.1:{listener.getsockname()[1]}", "tempering",
                              timeout_s=1.0)
        m = Machine(opcua_pki, history_store=store)
        async with m:
            answer_per_node(m.server.server)
            async with await opcua_pki.client("viewer") as viewer:
                pump = client_node(viewer, m.nodes.zones["pump"]["Temperature"])
                started = time.monotonic()
                values, cont, status = await _read(pump, _at(0), _at(time.time()), 0)
                took = time.monotonic() - started
                assert status.value == ua.StatusCodes.BadDataUnavailable
                assert 0.9 < took < 1.0 + 1.0
    finally:
        listener.close()


def test_the_window_reads_history_where_the_sink_writes():
    from historian.config import SinkSettings
    from opcua_server.history_influx import history_store

    local = object()
    assert history_store(SinkSettings(), local) is local
    one = history_store(SinkSettings(kind="influxdb1", url="http://db:8086", database="plant",
                                     retention_policy="year", username="u", password="pw"), local)
    assert (one.url, one.database, one.retention_policy) == ("http://db:8086", "plant", "year")
    assert one._headers["Authorization"].startswith("Basic ")
    two = history_store(SinkSettings(kind="influxdb2", url="https://db:8086", org="o",
                                     bucket="tempering/autogen", token="secret-token"), local)
    assert (two.database, two.retention_policy) == ("tempering", "autogen")
    assert two._headers["Authorization"] == "Token secret-token"
    assert "secret-token" not in repr(two)
