"""A zone's autotune over OPC UA (``Machine.Zones.<Zone>.Autotune``, ZoneAutotuneType), through
real asyncua clients over SignAndEncrypt on the test machine: neutral Good values before any
autotune; Start refused by role (BadUserAccessDenied), by range (BadOutOfRange) and by the
scan's state (BadInvalidState with its reason), each refusal audited and changing nothing; with
a batch heating, Start runs the experiment (Stage leaves idle, Progress rises) and Abort ends it
with the gains unchanged; a proposal is published and Accept makes it the zone's gains.

The test machine runs in real time and an experiment takes some ten minutes of machine time
(settle, relay periods, step), so the proposal is put into the PLC's state between two scans
(what the scan would leave there), and from there it travels the real way: snapshot, bridge,
publisher, client, Accept, scan, settings."""

from __future__ import annotations

from dataclasses import replace

from asyncua import ua

from machines import InProcessMachine, until
from opcua_server.model import ZONE_NODES
from plc import autotune as tune_mod
from plc.tuning import Gains, Model, Prediction

VARIABLES = ("Stage", "Progress", "Message", "ModelGain", "ModelTimeConstant", "ModelDeadTime",
             "ModelIntegrating", "ProposedKp", "ProposedKi", "ProposedKd", "PreviousKp", "PreviousKi",
             "PreviousKd", "PredictedOvershoot", "PredictedSettlingTime", "PredictedMaxSensitivity",
             "PredictedGainMargin", "PredictedPhaseMargin")
METHODS = ("Start", "Abort", "Accept", "Reject")


async def call(client, m, zone: str, method: str, *args) -> str:
    """Call ``Zones.<Zone>.Autotune.<method>``; the StatusCode's name."""
    owner = client.get_node(m.nodes.objects[f"Zones.{ZONE_NODES[zone]}.Autotune"].nodeid)
    try:
        await owner.call_method(m.nodes.autotune[zone][method].nodeid, *args)
    except ua.UaStatusCodeError as err:
        return type(err).__name__
    return "Good"


def amplitude(pct: float) -> ua.Variant:
    return ua.Variant(pct, ua.VariantType.Double)


async def read(client, m, zone: str, name: str):
    return await client.get_node(m.nodes.autotune[zone][name]).read_value()


def audit(m, target: str) -> list[dict]:
    return [e for e in m.records.audit_entries(1000) if e["target"] == target]


async def test_neutral_values_and_refusals_by_role_range_and_state(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        assert set(m.nodes.autotune) == set(m.nodes.zones)
        assert set(m.nodes.autotune["pump"]) == set(VARIABLES) | set(METHODS)
        assert m.nodes.autotune["pump"]["Stage"].nodeid.Identifier == "Machine.Zones.Pump.Autotune.Stage"
        await until(lambda: m.server.publisher.publications >= 2)
        async with await opcua_pki.client("operator") as op, \
                await opcua_pki.client("technician") as tech:
            for zone in m.nodes.autotune:
                nodes = [tech.get_node(m.nodes.autotune[zone][v]) for v in VARIABLES]
                values = await tech.read_attributes(nodes, ua.AttributeIds.Value)
                assert all(dv.StatusCode.is_good() for dv in values), zone
                got = dict(zip(VARIABLES, (dv.Value.Value for dv in values)))
                assert got == {**dict.fromkeys(VARIABLES, 0.0), "Stage": "idle", "Message": "",
                               "ModelIntegrating": False}, zone
            kp = await tech.get_node(m.nodes.zones["pump"]["Kp"]).read_value()

            assert await call(op, m, "pump", "Start", amplitude(0.0)) == "BadUserAccessDenied"
            assert await call(tech, m, "pump", "Start", amplitude(150.0)) == "BadOutOfRange"
            assert await call(tech, m, "pump", "Start", ua.Variant("30", ua.VariantType.String)) == "BadTypeMismatch"
            assert await call(tech, m, "pump", "Start", amplitude(0.0)) == "BadInvalidState"   # idle: no batch
            assert await call(tech, m, "pump", "Accept") == "BadInvalidState"                  # no proposal
            assert await call(op, m, "pump", "Reject") == "BadUserAccessDenied"
            assert await call(tech, m, "pump", "Abort") == "BadInvalidState"                   # none running

            n = m.server.publisher.publications
            await until(lambda: m.server.publisher.publications >= n + 2)
            assert await read(tech, m, "pump", "Stage") == "idle"
            assert await tech.get_node(m.nodes.zones["pump"]["Kp"]).read_value() == kp
        starts = audit(m, "pump.Autotune.Start")[::-1]
        assert [(e["user"], e["result"].split(":")[0]) for e in starts] == [
            ("operator", "BadUserAccessDenied"), ("technician", "BadOutOfRange"),
            ("technician", "BadTypeMismatch"), ("technician", "BadInvalidState")]
        assert "needs technician" in starts[0]["result"]
        assert "5..100" in starts[1]["result"]
        assert "only while a batch is heating" in starts[3]["result"] and starts[3]["command_id"]
        assert "no autotune proposal" in audit(m, "pump.Autotune.Accept")[0]["result"]


async def test_with_a_batch_heating_start_runs_the_experiment_and_abort_ends_it(opcua_pki):
    async with InProcessMachine(opcua_pki, initial_temp_c=48.0) as m:      # dark-70 heats to 48 °C
        async with await opcua_pki.client("operator") as op, \
                await opcua_pki.client("technician") as tech:
            sequencer = op.get_node(m.nodes.objects["Sequencer"].nodeid)
            await sequencer.call_method(m.nodes.methods["StartRecipe"].nodeid,
                                        ua.Variant("dark-70", ua.VariantType.String))
            await sequencer.call_method(m.nodes.methods["Hold"].nodeid)
            kp = await tech.get_node(m.nodes.zones["pump"]["Kp"]).read_value()
            output = tech.get_node(m.nodes.zones["pump"]["Output"])

            async def loop_active():          # the heaters follow the mixer after mixer_delay (10 s)
                return await output.read_value() != 0.0
            await until(loop_active, timeout_s=30.0)

            assert await call(tech, m, "pump", "Start", amplitude(20.0)) == "Good"
            async def stage(want: str):
                return await read(tech, m, "pump", "Stage") == want
            await until(lambda: stage("settle"))
            assert await call(tech, m, "fountain", "Start", amplitude(0.0)) == "BadInvalidState"  # one at a time
            await until(lambda: read(tech, m, "pump", "Progress"), timeout_s=30.0)   # settling at 48 °C
            assert 0.0 < await read(tech, m, "pump", "Progress") <= 10.0
            assert "settling" in await read(tech, m, "pump", "Message")

            assert await call(tech, m, "pump", "Abort") == "Good"
            await until(lambda: stage("aborted"))
            assert "aborted by technician" in await read(tech, m, "pump", "Message")
            assert await read(tech, m, "pump", "Progress") == 0.0
            assert await read(tech, m, "pump", "ProposedKp") == 0.0
            assert await tech.get_node(m.nodes.zones["pump"]["Kp"]).read_value() == kp
            assert await call(tech, m, "pump", "Accept") == "BadInvalidState"
        assert [e["result"] for e in audit(m, "pump.Autotune.Start")][-1] == "Good"
        assert audit(m, "pump.Autotune.Abort")[0]["result"] == "Good"


async def test_a_proposal_is_published_and_accept_makes_it_the_zone_gains(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        await until(lambda: m.server.publisher.publications >= 2)
        state = m.controller.state
        previous = {"kp": 80.0, "ki": 0.8, "kd": 0.5}
        model = Model(gain_k_per_pct=0.0135, tau_s=35.5, dead_s=9.2, rms_k=0.048, samples=600, step_s=1.05)
        proposal = tune_mod.Outcome(
            zone="pump", status=tune_mod.PROPOSED, message="model: K 0.0135 K/%, tau 35.5 s, dead time 9.2 s",
            time_s=0.0, user="technician", model=model, gains=Gains(kp=142.2, ki=4.0, kd=12.5, tau_c_s=9.2),
            prediction=Prediction(overshoot_k=0.17, settling_s=None, load_peak_k=0.05, load_recovery_s=0.0,
                                  ms=1.59, gain_margin=3.15, phase_margin_deg=61.2), previous=previous)
        m.controller.state = replace(state, autotune_outcomes={**state.autotune_outcomes, "pump": proposal})
        async with await opcua_pki.client("technician") as tech, await opcua_pki.client("viewer") as viewer:
            async def proposed():
                return await read(viewer, m, "pump", "Stage") == "proposed"
            await until(proposed)
            got = {v: await read(viewer, m, "pump", v) for v in VARIABLES if v != "PredictedSettlingTime"}
            assert got == {"Stage": "proposed", "Progress": 100.0, "Message": proposal.message,
                           "ModelGain": 0.0135, "ModelTimeConstant": 35.5, "ModelDeadTime": 9.2,
                           "ModelIntegrating": False, "ProposedKp": 142.2, "ProposedKi": 4.0,
                           "ProposedKd": 12.5, "PreviousKp": 80.0, "PreviousKi": 0.8, "PreviousKd": 0.5,
                           "PredictedOvershoot": 0.17, "PredictedMaxSensitivity": 1.59,
                           "PredictedGainMargin": 3.15, "PredictedPhaseMargin": 61.2}
            settling = await viewer.get_node(m.nodes.autotune["pump"]["PredictedSettlingTime"]).read_data_value(
                raise_on_bad_status=False)       # the prediction never settles: no number, and why
            assert settling.StatusCode.value == ua.StatusCodes.BadNoData and settling.Value.Value is None

            assert await call(viewer, m, "pump", "Accept") == "BadUserAccessDenied"
            assert await call(tech, m, "pump", "Accept") == "Good"

            async def applied():
                return await tech.get_node(m.nodes.zones["pump"]["Kp"]).read_value() == 142.2
            await until(applied)
            assert await tech.get_node(m.nodes.zones["pump"]["Ki"]).read_value() == 4.0
            assert await tech.get_node(m.nodes.zones["pump"]["Kd"]).read_value() == 12.5
            assert await read(tech, m, "pump", "Stage") == "accepted"
            assert await call(tech, m, "pump", "Reject") == "BadInvalidState"          # nothing left to reject
        assert m.controller.state.tuning["pump"]["kp"] == 142.2
        accepted = audit(m, "pump.Autotune.Accept")
        assert [(e["user"], e["result"].split(":")[0]) for e in accepted[::-1]] == [
            ("viewer", "BadUserAccessDenied"), ("technician", "Good")]
