"""An address space without holes: a generic client that browses the running machine and reads
every variable — the alarm conditions' too — finds a value in each once the first publications
are out (none left BadWaitingForInitialData), and a zone's Temperature has one writer (the
scan's verdict on the zone) whatever its sensor does."""

from __future__ import annotations

from asyncua import ua

from machines import InProcessMachine, until

WAITING = ua.StatusCodes.BadWaitingForInitialData


async def variables_below(root):
    """Every Variable below ``root`` (hierarchical references, followed once per node)."""
    seen, found, stack = {root.nodeid}, [], [root]
    while stack:
        node = stack.pop()
        for child in await node.get_children(refs=ua.ObjectIds.HierarchicalReferences):
            if child.nodeid in seen:
                continue
            seen.add(child.nodeid)
            cls = await child.read_node_class()
            if cls is ua.NodeClass.Variable:
                found.append(child)
            if cls in (ua.NodeClass.Object, ua.NodeClass.Variable):
                stack.append(child)
    return found


async def test_every_variable_of_the_machine_has_a_value_after_the_first_publications(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        await until(lambda: m.server.publisher.publications >= 2)
        async with await opcua_pki.client("viewer") as client:
            machine = client.get_node(m.nodes.machine.nodeid)
            variables = await variables_below(machine)
            assert len(variables) > 1000       # the conditions' variables among them
            values = await client.read_attributes(variables, ua.AttributeIds.Value)
            holes = sorted(str(v.nodeid.Identifier) for v, dv in zip(variables, values)
                           if dv.StatusCode.value == WAITING)
            print("variables still waiting for their first value:", *holes, sep="\n  ")
            assert holes == []
            # where there is no number, the status says why; in auto ManualOutput follows Output
            zone = m.nodes.zones["pump"]
            sp = await client.get_node(zone["Setpoint"]).read_data_value(raise_on_bad_status=False)
            assert sp.StatusCode.value == ua.StatusCodes.BadOutOfService and sp.Value.Value is None
            assert (await client.get_node(zone["Mode"]).read_value()) == "auto"
            assert (await client.get_node(zone["ManualOutput"]).read_value()
                    == await client.get_node(zone["Output"]).read_value())
            state = m.nodes.diagnostics["Historian.State"]
            assert (await client.get_node(state).read_value()) == "disabled"     # run without one


async def test_a_zone_temperature_has_one_writer_and_a_bad_sensor_reads_bad_with_its_reason(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        pub = m.server.publisher
        await until(lambda: pub.publications >= 2)
        temp = m.nodes.zones["pump"]["Temperature"]
        writes: list[tuple] = []
        original = pub.server.write_attribute_value

        async def counting(nodeid, dv, *args, **kw):
            if nodeid == temp.nodeid:
                writes.append((pub.publications, dv.StatusCode.value))
            return await original(nodeid, dv, *args, **kw)
        pub.server.write_attribute_value = counting
        pub._last.pop(temp.nodeid, None)          # force the next publication to write it
        m.twin.set_sensor_fault("pump", "open")
        async with await opcua_pki.client("viewer") as client:
            node = client.get_node(temp.nodeid)

            async def bad():
                dv = await node.read_data_value(raise_on_bad_status=False)
                return dv.StatusCode.value == ua.StatusCodes.BadSensorFailure
            await until(bad)
            n = pub.publications
            await until(lambda: pub.publications >= n + 3)
        per_publication: dict[int, int] = {}
        for publication, _ in writes:
            per_publication[publication] = per_publication.get(publication, 0) + 1
        assert writes and max(per_publication.values()) == 1, per_publication
