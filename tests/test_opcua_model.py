"""The OPC UA information model (nodesets/Tempering.Types.NodeSet2.xml) and the address space
built from it (opcua_server.model): the file is a valid NodeSet2 that asyncua imports and
node-opcua (an independent implementation) loads; every node is described; analog values carry
their UNECE unit and range; every process-image point has a node; what the configuration lists
(recipes, alarms, links) becomes objects; writable means CurrentRead|CurrentWrite and nothing else
is; both builders make the same address space; the export re-imports into a fresh server."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import xml.etree.ElementTree as Et
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import Server, ua

from tempering.cli import main
from opcua_server.config import load
from opcua_server.model import (CONDITION_OPTIONALS, MACHINE_URI_PREFIX, PHASE_VALUES, POINT_PATHS,
                                RECIPE_FIELDS, TYPE_IDS, TYPES_NODESET, TYPES_URI, Writable,
                                add_recipe_nodes, build_machine, export_nodeset, load_types, recipe_value,
                                remove_recipe_nodes)
from plc.config import RecipeBook
from plc.image import PointType
from plc.interlocks import condition_ids
from plc.contract import INPUT_SPECS, OUTPUT_SPECS, ZONES
from plc.program import Program
from plc.state import Phase

ROOT = Path(__file__).resolve().parent.parent
NPM_TOOLS = ROOT / ".npm-tools"
LOAD_NODESET_JS = ROOT / "tests" / "js" / "load_nodeset.mjs"
UANODESET = "{http://opcfoundation.org/UA/2011/03/UANodeSet.xsd}"
UNITS_URI = "http://www.opcfoundation.org/UA/units/un/cefact"
shared_loop = pytest.mark.asyncio(loop_scope="module")

A = ua.AttributeIds


def unece(code: str) -> int:
    """UnitId of a UNECE common code (OPC UA Part 8 §5.6.3)."""
    value = 0
    for c in code:
        value = (value << 8) | ord(c)
    return value


EXPECTED_UNIT = {
    **dict.fromkeys(("Temperature", "Setpoint", "HeatingGoal", "CoolingGoal", "PouringGoal",
                     "WorkingMax"), "CEL"),
    "Trim": "KEL",
    **dict.fromkeys(("Output", "ManualOutput", "Kp", "Ki", "Kd", "SpoolFill"), "P1"),
    **dict.fromkeys(("Current", "CurrentTotal"), "AMP"),
    **dict.fromkeys(("VoltageL1", "VoltageL2", "VoltageL3"), "VLT"),
    "Frequency": "HTZ",
    **dict.fromkeys(("PhaseTime", "PedalOnTime", "PedalOffTime", "AcceptanceHeatingDwell"), "SEC"),
    **dict.fromkeys(("AcceptanceCoolingUndershoot", "AcceptancePouringBand", "AcceptanceTolerance"), "KEL"),
    "AcceptancePouringMinShare": "P1",
    **dict.fromkeys(("LogicP50", "LogicP99", "LateP50", "LateP99", "LateMax", "RttP50", "RttP99"), "C26"),
    # a zone's Autotune (ZoneAutotuneType); K/% has no UNECE code (KEL), Ms and the gain margin are ratios
    **dict.fromkeys(("Progress", "ProposedKp", "ProposedKi", "ProposedKd", "PreviousKp", "PreviousKi",
                     "PreviousKd"), "P1"),
    **dict.fromkeys(("ModelGain", "PredictedOvershoot"), "KEL"),
    **dict.fromkeys(("ModelTimeConstant", "ModelDeadTime", "PredictedSettlingTime"), "SEC"),
    **dict.fromkeys(("PredictedMaxSensitivity", "PredictedGainMargin"), "C62"),
    "PredictedPhaseMargin": "DD",
}
CONTRACT_RANGES = {"Temperature": (-20, 70), "Output": (-100, 100), "Trim": (-2, 2),
                   "ManualOutput": (-100, 100), "Current": (0, 20), "VoltageL1": (0, 300),
                   "Frequency": (40, 60), "CurrentTotal": (0, 50), "SpoolFill": (0, 100)}
ZONE_WRITABLE = {"Trim", "Mode", "ManualOutput", "Kp", "Ki", "Kd"}
METHOD_ARGUMENTS = {
    "StartRecipe": ["RecipeId"], "Stop": [], "Hold": [], "Resume": [], "Abort": [], "ResetTrips": [],
    "AcknowledgeAll": [],
    "AddRecipe": ["RecipeId", "Name", "HeatingGoal", "CoolingGoal", "PouringGoal", "WorkingMax"],
    "UpdateRecipe": ["RecipeId", "Field", "Value"], "DeleteRecipe": ["RecipeId"],
    "DuplicateRecipe": ["SourceId", "NewId", "NewName"],
    "GetBatch": ["BatchId"],
}


# --------------------------------------------------------------------------- helpers


def machine_config():
    cfg, book = load()
    return cfg, book, condition_ids(Program.from_config(cfg, book)), tuple(cfg.fieldbus.links)


async def new_server() -> Server:
    server = Server()
    await server.init()
    return server


def attr(server: Server, nid: ua.NodeId, attribute: ua.AttributeIds):
    av = server.iserver.aspace[nid].attributes.get(attribute)
    return None if av is None else av.value


def value(server: Server, nid: ua.NodeId):
    return attr(server, nid, A.Value).Value.Value


def namespace_nodes(server: Server, ns: int) -> list[ua.NodeId]:
    """The nodes of a namespace, without the NamespaceMetadata object (Server/Namespaces/<uri>)
    asyncua's importer adds in the namespace of each model it imports."""
    aspace = server.iserver.aspace
    metadata = set()
    for r in aspace[ua.NodeId(ua.ObjectIds.Server_Namespaces)].references:
        if r.IsForward and r.NodeId.NamespaceIndex == ns:
            metadata |= {r.NodeId, *(c.NodeId for c in aspace[r.NodeId].references if c.IsForward)}
    return [n for n in aspace.keys() if n.NamespaceIndex == ns and n not in metadata]


def child(server: Server, nid: ua.NodeId, name: str) -> ua.NodeId:
    for r in server.iserver.aspace[nid].references:
        if r.IsForward and r.BrowseName.Name == name and r.ReferenceTypeId != ua.NodeId(ua.ObjectIds.HasTypeDefinition):
            return r.NodeId
    raise KeyError(f"{nid.to_string()} has no child {name}")


def type_definition(server: Server, nid: ua.NodeId) -> ua.NodeId | None:
    for r in server.iserver.aspace[nid].references:
        if r.IsForward and r.ReferenceTypeId == ua.NodeId(ua.ObjectIds.HasTypeDefinition):
            return r.NodeId
    return None


def snapshot(server: Server, ns: int) -> dict[str, tuple]:
    """Everything about the nodes of a namespace but timestamps, comparable across servers."""
    out = {}
    for nid in namespace_nodes(server, ns):
        nd = server.iserver.aspace[nid]
        attrs = {k.name: (v.value.Value, v.value.StatusCode) for k, v in nd.attributes.items()}
        refs = sorted((r.ReferenceTypeId.to_string(), r.NodeId.to_string(), r.IsForward, r.BrowseName.to_string(),
                       r.DisplayName.Text, int(r.NodeClass)) for r in nd.references)
        out[nid.to_string()] = (attrs, refs)
    return out


def snapshot_ids(server: Server, ns: int) -> set[str]:
    return {n.Identifier for n in namespace_nodes(server, ns)}


def run_node_opcua(uris: list[str], *files: Path) -> dict:
    """Counts of nodes per namespace once node-opcua has loaded the standard nodeset and ours.
    Node.js: the one `make js-deps` put in .npm-tools when the system's is too old, else the system's."""
    bundled = NPM_TOOLS / "node_modules" / ".bin" / "node"
    node = str(bundled) if bundled.exists() else shutil.which("node")
    if node is None or not (NPM_TOOLS / "node_modules" / "node-opcua-address-space").is_dir():
        pytest.fail("node-opcua is not installed: run `make js-deps` (node, npm and .npm-tools)")
    proc = subprocess.run([node, str(LOAD_NODESET_JS), str(NPM_TOOLS), ",".join(uris), *map(str, files)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def types_xml() -> Et.Element:
    return Et.parse(TYPES_NODESET).getroot()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def machine():
    """The default machine built in a server that is set up but never started."""
    cfg, book, conditions, links = machine_config()
    server = await new_server()
    nodes = await build_machine(server, cfg, book, conditions, links)
    return server, nodes, cfg, book, conditions


# --------------------------------------------------------------------------- the NodeSet2 file


def test_types_file_is_a_nodeset_with_models_aliases_and_descriptions(types_xml):
    assert [u.text for u in types_xml.find(f"{UANODESET}NamespaceUris")] == [TYPES_URI]
    model = types_xml.find(f"{UANODESET}Models/{UANODESET}Model")
    assert model.get("ModelUri") == TYPES_URI and model.get("Version") and model.get("PublicationDate")
    required = model.findall(f"{UANODESET}RequiredModel")
    assert [r.get("ModelUri") for r in required] == ["http://opcfoundation.org/UA/"]
    assert required[0].get("Version") and required[0].get("PublicationDate")
    aliases = {a.get("Alias"): a.text for a in types_xml.find(f"{UANODESET}Aliases")}
    nodes = [n for n in types_xml if n.tag.startswith(f"{UANODESET}UA")]
    ids = [n.get("NodeId") for n in nodes]
    assert len(ids) == len(set(ids)) > 300
    for n in nodes:
        desc = n.find(f"{UANODESET}Description")
        assert desc is not None and (desc.text or "").strip(), n.get("NodeId")
        for r in n.find(f"{UANODESET}References"):
            assert r.get("ReferenceType") in aliases, r.get("ReferenceType")
            assert not r.text.startswith("ns=1;") or r.text in ids, (n.get("NodeId"), r.text)
        dtype = n.get("DataType")
        assert dtype is None or dtype in aliases or dtype.startswith("ns=1;"), dtype


def test_types_import_into_asyncua_once(machine):
    server, nodes, *_ = machine
    ns = nodes.types_namespace_index
    for name, number in TYPE_IDS.items():
        assert attr(server, ua.NodeId(number, ns), A.BrowseName).Value.Value == ua.QualifiedName(name, ns)
    before = len(namespace_nodes(server, ns))
    assert before == len([n for n in Et.parse(TYPES_NODESET).getroot() if n.tag.startswith(f"{UANODESET}UA")])
    for nid in namespace_nodes(server, ns):
        text = attr(server, nid, A.Description).Value.Value.Text
        assert text and text.strip(), nid.to_string()


@shared_loop
async def test_load_types_is_idempotent(machine):
    server, nodes, *_ = machine
    before = len(namespace_nodes(server, nodes.types_namespace_index))
    assert await load_types(server) == nodes.types_namespace_index
    assert len(namespace_nodes(server, nodes.types_namespace_index)) == before


def test_enumerations_follow_the_plc_enums(machine):
    server, nodes, *_ = machine
    ns = nodes.types_namespace_index
    phase_strings = value(server, child(server, ua.NodeId(3001, ns), "EnumStrings"))
    assert [t.Text for t in phase_strings] == [p.value for p in Phase]
    assert PHASE_VALUES == {p: i for i, p in enumerate(Phase)}
    definition = attr(server, ua.NodeId(3001, ns), A.DataTypeDefinition).Value.Value
    assert [(f.Name, f.Value) for f in definition.Fields] == [(p.value, i) for i, p in enumerate(Phase)]
    assert all(f.Description.Text for f in definition.Fields)


def test_every_component_of_a_type_is_a_mandatory_instance_declaration(machine):
    server, nodes, *_ = machine
    ns = nodes.types_namespace_index
    placeholders, other = set(), set()
    for nid in namespace_nodes(server, ns):
        if attr(server, nid, A.NodeClass).Value.Value in (ua.NodeClass.ObjectType, ua.NodeClass.DataType):
            continue
        rules = [r.NodeId for r in server.iserver.aspace[nid].references
                 if r.IsForward and r.ReferenceTypeId == ua.NodeId(ua.ObjectIds.HasModellingRule)]
        assert len(rules) == 1, nid.to_string()
        name = attr(server, nid, A.BrowseName).Value.Value.Name
        if rules[0] == ua.NodeId(ua.ObjectIds.ModellingRule_OptionalPlaceholder):
            placeholders.add(name)
        else:
            assert rules[0] == ua.NodeId(ua.ObjectIds.ModellingRule_Mandatory), nid.to_string()
            other.add(name)
    assert placeholders == {"<RecipeId>", "<LinkName>"}


def test_alarm_types_and_methods_of_the_types(machine):
    server, nodes, *_ = machine
    ns = nodes.types_namespace_index
    O = ua.ObjectIds
    for name, base in (("TemperatureLevelAlarmType", O.ExclusiveLevelAlarmType),
                       ("TemperatureDeviationAlarmType", O.ExclusiveDeviationAlarmType),
                       ("MachineOffNormalAlarmType", O.OffNormalAlarmType),
                       ("MachineDiscreteAlarmType", O.DiscreteAlarmType)):
        supertype = [r.NodeId for r in server.iserver.aspace[ua.NodeId(TYPE_IDS[name], ns)].references
                     if not r.IsForward and r.ReferenceTypeId == ua.NodeId(O.HasSubtype)]
        assert supertype == [ua.NodeId(base)], name
    for type_name, names in (("SequencerType", ["StartRecipe", "Stop", "Hold", "Resume", "Abort", "ResetTrips",
                                                 "AcknowledgeAll"]),
                             ("RecipeBookType", ["AddRecipe", "UpdateRecipe", "DeleteRecipe", "DuplicateRecipe"])):
        for name in names:
            method = child(server, ua.NodeId(TYPE_IDS[type_name], ns), name)
            assert attr(server, method, A.NodeClass).Value.Value is ua.NodeClass.Method
            args = value(server, child(server, method, "InputArguments")) if METHOD_ARGUMENTS[name] else []
            assert [a.Name for a in args] == METHOD_ARGUMENTS[name]
            assert all(a.Description.Text for a in args)


# --------------------------------------------------------------------------- the machine


def test_every_instance_node_has_a_description(machine):
    server, nodes, *_ = machine
    missing = [n.to_string() for n in namespace_nodes(server, nodes.namespace_index)
               if not (attr(server, n, A.Description).Value.Value.Text or "").strip()]
    assert missing == []


def test_analog_values_carry_their_unece_unit_and_a_range(machine):
    server, nodes, *_ = machine
    analog = ua.NodeId(ua.ObjectIds.AnalogItemType)
    seen = set()
    for nid in namespace_nodes(server, nodes.namespace_index):
        name = attr(server, nid, A.BrowseName).Value.Value.Name
        if attr(server, nid, A.NodeClass).Value.Value is not ua.NodeClass.Variable or name not in EXPECTED_UNIT:
            continue
        assert type_definition(server, nid) == analog, nid.to_string()
        assert attr(server, nid, A.DataType).Value.Value == ua.NodeId(ua.ObjectIds.Double)
        eu = value(server, child(server, nid, "EngineeringUnits"))
        assert (eu.NamespaceUri, eu.UnitId) == (UNITS_URI, unece(EXPECTED_UNIT[name])), nid.to_string()
        assert eu.DisplayName.Text and eu.Description.Text
        rng = value(server, child(server, nid, "EURange"))
        assert isinstance(rng, ua.Range) and rng.Low < rng.High, nid.to_string()
        if name in CONTRACT_RANGES:
            assert (rng.Low, rng.High) == CONTRACT_RANGES[name], nid.to_string()
        seen.add(name)
    assert seen == set(EXPECTED_UNIT)
    others = [n.to_string() for n in namespace_nodes(server, nodes.namespace_index)
              if type_definition(server, n) == analog and attr(server, n, A.BrowseName).Value.Value.Name not in EXPECTED_UNIT]
    assert others == []


def test_every_process_image_point_has_a_node_of_its_type(machine):
    server, nodes, *_ = machine
    specs = {**INPUT_SPECS, **OUTPUT_SPECS}
    assert set(POINT_PATHS) == set(specs) == set(nodes.points)
    for name, spec in specs.items():
        nid = nodes.points[name].nodeid
        assert nid == ua.NodeId(f"Machine.{POINT_PATHS[name]}", nodes.namespace_index)
        dtype = attr(server, nid, A.DataType).Value.Value
        want = ua.ObjectIds.Boolean if spec.type is PointType.BOOL else ua.ObjectIds.Double
        assert dtype == ua.NodeId(want), name
        assert name in attr(server, nid, A.Description).Value.Value.Text
    assert nodes.points["temp_pump"].nodeid.Identifier == "Machine.Zones.Pump.Temperature"
    assert nodes.points["heater_tank_bottom"].nodeid.Identifier == "Machine.Outputs.HeaterTankBottom"


def test_the_nodes_by_name(machine):
    server, nodes, cfg, book, conditions = machine
    assert set(nodes.zones) == set(ZONES)
    assert all(set(z) == {"Temperature", "Setpoint", "Output", "Trim", "Mode", "ManualOutput", "Kp", "Ki", "Kd",
                          "Heater"} for z in nodes.zones.values())
    assert set(nodes.motors) == {"mixer", "pump", "vibration"}
    assert {"Phase", "PhaseTime", "Held", "Interrupted", "Tempered", "PouringReleased", "RecipeId", "BatchId",
            "StartRecipe", "AcknowledgeAll"} <= set(nodes.sequencer)
    assert set(nodes.methods) == set(METHOD_ARGUMENTS)
    assert set(nodes.recipes) == set(book.ids)
    assert all(set(r) == set(RECIPE_FIELDS) for r in nodes.recipes.values())
    assert list(nodes.conditions) == list(conditions)
    over = nodes.conditions["zone.pump.over_temp"].nodeid
    below = {r.BrowseName.Name for r in server.iserver.aspace[over].references if r.IsForward}
    assert {"EnabledState", "ActiveState", "AckedState", "Acknowledge", "Retain", "HighLimit"} | (
        CONDITION_OPTIONALS - {"TransitionTime", "LastTransition"}) <= below
    assert "LowLimit" not in below and "SilenceState" not in below
    assert set(nodes.alarms_summary) == {"ActiveAlarms", "ActiveCount", "UnacknowledgedCount", "ShelvedAlarms",
                                         "OutOfServiceAlarms"}
    assert {"AlarmsLast10Min", "InFlood", "ChatteringAlarms", "StaleAlarms", "TopAlarms"} <= set(nodes.alarm_performance)
    assert {"Scan.LateP99", "Links.io.State", "Historian.Backlog", "Sessions", "Subscriptions"} <= set(nodes.diagnostics)
    assert nodes.objects["Alarms.zone.pump.over_temp"].nodeid.Identifier == "Machine.Alarms.zone.pump.over_temp"
    assert nodes.objects["Recipes.dark-70"].nodeid.Identifier == "Machine.Recipes.dark-70"
    assert attr(server, nodes.machine.nodeid, A.EventNotifier).Value.Value == 1
    assert attr(server, nodes.machine.nodeid, A.BrowseName).Value.Value == ua.QualifiedName(
        cfg.machine.id, nodes.namespace_index)
    assert nodes.variant_types[nodes.sequencer["Phase"].nodeid] is ua.VariantType.Int32
    assert nodes.variant_types[nodes.diagnostics["Scan.Scans"].nodeid] is ua.VariantType.UInt64
    severity = ua.NodeId("Machine.Alarms.estop.Severity", nodes.namespace_index)
    assert nodes.variant_types[severity] is ua.VariantType.UInt16


def test_writable_is_current_read_write_and_the_rest_is_read_only(machine):
    server, nodes, cfg, book, _ = machine
    expected = {nodes.zones[z][f].nodeid: Writable("zone", z, f, "technician") for z in ZONES for f in ZONE_WRITABLE}
    expected |= {nodes.recipes[r][f].nodeid: Writable("recipe", r, f, "admin") for r in book.ids for f in RECIPE_FIELDS}
    assert nodes.writable == expected
    for nid in namespace_nodes(server, nodes.namespace_index):
        if attr(server, nid, A.NodeClass).Value.Value is not ua.NodeClass.Variable:
            continue
        levels = (attr(server, nid, A.AccessLevel).Value.Value, attr(server, nid, A.UserAccessLevel).Value.Value)
        assert levels == ((3, 3) if nid in expected else (1, 1)), nid.to_string()
        if nid in expected:
            assert expected[nid].role in attr(server, nid, A.Description).Value.Value.Text


def test_values_from_the_config_and_process_values_waiting(machine):
    server, nodes, cfg, book, _ = machine
    ns = nodes.namespace_index
    assert value(server, ua.NodeId("Machine.MachineId", ns)) == cfg.machine.id
    assert value(server, ua.NodeId("Machine.Name", ns)) == cfg.machine.name
    for z in ZONES:
        assert value(server, nodes.zones[z]["Kp"].nodeid) == cfg.zones[z].kp
        assert value(server, nodes.zones[z]["Ki"].nodeid) == cfg.zones[z].ki
    for rid in book.ids:
        for browse, field in RECIPE_FIELDS.items():
            assert value(server, nodes.recipes[rid][browse].nodeid) == recipe_value(book[rid].model_dump(), field)
    temp = attr(server, nodes.points["temp_pump"].nodeid, A.Value)
    assert temp.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData and temp.Value.Value is None
    phase = attr(server, nodes.sequencer["Phase"].nodeid, A.Value)
    assert phase.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData
    eurange = attr(server, ua.NodeId("Machine.Zones.Pump.Temperature.EURange", ns), A.Value)
    assert eurange.StatusCode.is_good() and eurange.Value.Value == ua.Range(-20, 70)


def test_descriptions_that_depend_on_the_config(machine):
    server, nodes, cfg, book, _ = machine

    def desc(node):
        return attr(server, node.nodeid, A.Description).Value.Value.Text

    limit = min(cfg.zones["pump"].max_temp, cfg.machine_config.abs_max_heat)
    assert desc(nodes.zones["pump"]["Temperature"]).startswith("Zone 3 pump: chocolate temperature")
    assert f"{limit:g} °C" in desc(nodes.zones["pump"]["Temperature"])
    assert desc(nodes.zones["tank_bottom"]["Trim"]).startswith("Zone 1 tank bottom: ")
    assert desc(nodes.recipes["dark-70"]["PouringGoal"]).startswith("Recipe dark-70: ")
    retain = ua.NodeId("Machine.Alarms.zone.pump.over_temp.Retain", nodes.namespace_index)
    assert attr(server, retain, A.Description).Value.Value.Text.startswith("Alarm zone.pump.over_temp: ")
    high = ua.NodeId("Machine.Alarms.zone.pump.over_temp.HighLimit", nodes.namespace_index)
    assert value(server, high) == limit
    assert f"{limit:g} °C" in desc(nodes.objects["Alarms.zone.pump.over_temp"])
    assert f"{cfg.zones['tank_bottom'].i_motor1:g} A" in desc(nodes.motors["mixer"]["Current"])
    assert "cool1_tank" in desc(nodes.zones["tank_bottom"]["Output"])
    assert desc(nodes.diagnostics["Links.io.State"]).startswith("Link io: ")
    assert "5020" in desc(nodes.objects["Diagnostics.Links.io"])


# --------------------------------------------------------------------------- two builders, config


@pytest.mark.asyncio
async def test_the_naive_and_the_template_builder_make_the_same_address_space():
    cfg, book, conditions, links = machine_config()
    naive, fast = await new_server(), await new_server()
    n1 = await build_machine(naive, cfg, book, conditions, links, naive=True)
    n2 = await build_machine(fast, cfg, book, conditions, links)
    a, b = snapshot(naive, n1.namespace_index), snapshot(fast, n2.namespace_index)
    assert set(a) == set(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert n1.writable == n2.writable and n1.variant_types == n2.variant_types
    assert {k: v.nodeid for k, v in n1.points.items()} == {k: v.nodeid for k, v in n2.points.items()}


@pytest.mark.asyncio
async def test_recipes_alarms_and_links_follow_the_config_and_recipes_come_and_go():
    cfg, book, _, _ = machine_config()
    small = RecipeBook(recipes={"milk-35": book["milk-35"]})
    cfg = cfg.model_copy(update={"fieldbus": None})
    server = await new_server()
    nodes = await build_machine(server, cfg, small, ["estop", "custom.alarm"], ())
    assert list(nodes.recipes) == ["milk-35"]
    assert list(nodes.conditions) == ["estop", "custom.alarm"]
    assert nodes.conditions["custom.alarm"].nodeid.Identifier == "Machine.Alarms.custom.alarm"
    assert not any(k.startswith("Links.") for k in nodes.diagnostics)
    before = len(namespace_nodes(server, nodes.namespace_index))

    added = await add_recipe_nodes(server, nodes, "dark-70", book["dark-70"])
    assert set(added) == set(RECIPE_FIELDS) and nodes.recipes["dark-70"] is added
    assert value(server, added["WorkingMax"].nodeid) == book["dark-70"].working_max
    assert nodes.writable[added["PouringGoal"].nodeid] == Writable("recipe", "dark-70", "PouringGoal", "admin")
    browsed = {(await c.read_browse_name()).Name for c in await nodes.recipes_folder.get_children()}
    assert {"milk-35", "dark-70", "AddRecipe"} <= browsed
    with pytest.raises(ValueError):
        await add_recipe_nodes(server, nodes, "dark-70", book["dark-70"])

    await remove_recipe_nodes(server, nodes, "dark-70")
    assert "dark-70" not in nodes.recipes and "Recipes.dark-70" not in nodes.objects
    assert len(namespace_nodes(server, nodes.namespace_index)) == before
    dangling = [(n.to_string(), r.NodeId.to_string()) for n in namespace_nodes(server, nodes.namespace_index)
                for r in server.iserver.aspace[n].references if r.NodeId not in server.iserver.aspace]
    assert dangling == []
    assert not any(w.key == "dark-70" for w in nodes.writable.values())
    await add_recipe_nodes(server, nodes, "dark-70", book["dark-70"])   # and back again
    assert len(namespace_nodes(server, nodes.namespace_index)) > before


# --------------------------------------------------------------------------- export, node-opcua


@shared_loop
async def test_export_nodeset_writes_a_file_that_reimports_into_a_fresh_server(machine, tmp_path, capsys):
    built, nodes, cfg, book, _ = machine
    out = tmp_path / "machine.xml"
    assert await asyncio.to_thread(main, ["export-nodeset", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and cfg.machine.id in printed
    root = Et.parse(out).getroot()
    uri = MACHINE_URI_PREFIX + cfg.machine.id
    model = root.find(f"{UANODESET}Models/{UANODESET}Model")
    assert model.get("ModelUri") == uri
    assert TYPES_URI in [r.get("ModelUri") for r in model.findall(f"{UANODESET}RequiredModel")]
    exported = [n for n in root if n.tag.startswith(f"{UANODESET}UA")]

    server = await new_server()
    await load_types(server)
    await server.import_xml(out)
    ns = await server.get_namespace_index(uri)
    assert len(exported) == len(namespace_nodes(server, ns)) == len(namespace_nodes(built, nodes.namespace_index))
    assert snapshot_ids(server, ns) == snapshot_ids(built, nodes.namespace_index)
    assert value(server, ua.NodeId("Machine.Zones.Pump.Temperature.EURange", ns)) == ua.Range(-20, 70)
    eu = value(server, ua.NodeId("Machine.PowerMeter.Frequency.EngineeringUnits", ns))
    assert eu.UnitId == unece("HTZ")
    assert value(server, ua.NodeId("Machine.Recipes.dark-70.HeatingGoal", ns)) == book["dark-70"].heating_goal
    pump = attr(server, ua.NodeId("Machine.Zones.Pump.Temperature", ns), A.Description).Value.Value.Text
    assert pump.startswith("Zone 3 pump: ")
    assert attr(server, ua.NodeId("Machine.Zones.Pump.Trim", ns), A.AccessLevel).Value.Value == 3
    assert attr(server, ua.NodeId("Machine", ns), A.EventNotifier).Value.Value == 1
    args = value(server, ua.NodeId("Machine.Sequencer.StartRecipe.InputArguments", ns))
    assert [a.Name for a in args] == ["RecipeId"]
    assert await asyncio.to_thread(main, ["export-nodeset", str(tmp_path / "missing" / "x.xml")]) == 1


def test_export_of_a_bad_config_prints_the_problems(tmp_path, capsys):
    bad = tmp_path / "machine.yaml"
    bad.write_text((ROOT / "config" / "tempering-machine.yaml").read_text().replace("kp: 80.0", "kp: -1", 1))
    (tmp_path / "recipes.yaml").write_text((ROOT / "config" / "recipes.yaml").read_text())
    (tmp_path / "register-map.yaml").write_text((ROOT / "config" / "register-map.yaml").read_text())
    assert main(["export-nodeset", str(tmp_path / "out.xml"), "--config", str(bad)]) == 1
    assert "kp" in capsys.readouterr().err
    assert not (tmp_path / "out.xml").exists()


def test_node_opcua_loads_the_types(types_xml):
    result = run_node_opcua([TYPES_URI], TYPES_NODESET)
    assert result["counts"][TYPES_URI] == len([n for n in types_xml if n.tag.startswith(f"{UANODESET}UA")])
    assert result["messages"] == []


@shared_loop
async def test_node_opcua_loads_the_types_and_the_exported_machine(machine, tmp_path):
    server, nodes, cfg, *_ = machine
    out = tmp_path / "machine.xml"
    await export_nodeset(server, out)
    uri = MACHINE_URI_PREFIX + cfg.machine.id
    result = run_node_opcua([TYPES_URI, uri], TYPES_NODESET, out)
    assert result["counts"][uri] == len(namespace_nodes(server, nodes.namespace_index))
    assert result["messages"] == []
