"""Batch records over OPC UA, through a real asyncua client: the last record and its verdict in
Batches/Last, a BatchCompletedEventType event on the Server object, GetBatch of any stored
batch (unknown: BadNotFound), Batches/Current while nothing runs, and the recipes' acceptance
criteria written by an admin (and refused out of range)."""

from __future__ import annotations

import json

from asyncua import ua

from batch_samples import record
from machines import InProcessMachine, until
from opcua_server.server import recipe_book


async def test_the_last_batch_its_event_and_any_batch_by_id(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        machine = m.cfg.machine.id
        rec = record(41, machine=machine, recipe="dark-70", verdict="FAIL",
                     reasons=("pouring within ±0.5 K of 31.5 °C for 61 % of the time (needs 90 %)",))
        await until(lambda: m.server.publisher.publications >= 1)
        async with await opcua_pki.client("viewer") as viewer:
            events = []

            class Handler:
                def event_notification(self, event):
                    events.append(event)

            sub = await viewer.create_subscription(50, Handler())
            event_type = ua.NodeId(1019, m.nodes.types_namespace_index)     # BatchCompletedEventType
            await sub.subscribe_events(viewer.nodes.server, event_type)
            current = viewer.get_node(m.nodes.batches["Current.BatchId"].nodeid)
            assert await current.read_value() == ""                         # nothing runs yet
            m.records.save_batch(rec)
            await m.server.batches.completed(rec)
            e = (await until(lambda: events))[0]
            assert (e.BatchId, e.Verdict, e.RecipeId) == (rec.batch_id, "FAIL", "dark-70")
            assert list(e.Reasons) == list(rec.reasons) and e.Severity == 700
            last = {name: await viewer.get_node(m.nodes.batches[f"Last.{name}"].nodeid).read_value()
                    for name in ("BatchId", "Verdict", "Reasons", "Energy", "AlarmCount", "Interruptions")}
            assert last == {"BatchId": rec.batch_id, "Verdict": "FAIL", "Reasons": list(rec.reasons),
                            "Energy": 12.5, "AlarmCount": 1, "Interruptions": 1}
            batches = viewer.get_node(m.nodes.objects["Batches"].nodeid)
            get = m.nodes.methods["GetBatch"].nodeid
            text = await batches.call_method(get, ua.Variant(rec.batch_id, ua.VariantType.String))
            assert json.loads(text)["batch_id"] == rec.batch_id and json.loads(text)["verdict"] == "FAIL"
            try:
                await batches.call_method(get, ua.Variant(f"{machine}-999999", ua.VariantType.String))
            except ua.UaStatusCodeError as err:
                refused = type(err).__name__
            else:
                refused = "Good"
            assert refused == "BadNotFound"


async def test_acceptance_criteria_are_recipe_fields_an_admin_writes(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        band = m.nodes.recipes["dark-70"]["AcceptancePouringBand"].nodeid
        share = m.nodes.recipes["dark-70"]["AcceptancePouringMinShare"].nodeid
        async with await opcua_pki.client("admin") as admin, await opcua_pki.client("technician") as tech:
            assert await admin.get_node(share).read_value() == 90.0          # % over OPC UA, 0.9 kept
            try:
                await tech.get_node(band).write_value(ua.DataValue(ua.Variant(0.8, ua.VariantType.Double)))
            except ua.UaStatusCodeError as err:
                refused = type(err).__name__
            assert refused == "BadUserAccessDenied"
            await admin.get_node(band).write_value(ua.DataValue(ua.Variant(0.8, ua.VariantType.Double)))
            await admin.get_node(share).write_value(ua.DataValue(ua.Variant(80.0, ua.VariantType.Double)))
            try:
                await admin.get_node(share).write_value(ua.DataValue(ua.Variant(150.0, ua.VariantType.Double)))
            except ua.UaStatusCodeError as err:
                refused = type(err).__name__
            assert refused == "BadOutOfRange"
        acceptance = m.server.book["dark-70"].acceptance
        assert (acceptance.pouring_band_k, acceptance.pouring_min_share) == (0.8, 0.8)
        stored = recipe_book(m.records)["dark-70"].acceptance          # kept in the records
        assert (stored.pouring_band_k, stored.pouring_min_share) == (0.8, 0.8)
