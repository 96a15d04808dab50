// An OPC UA client of another stack (node-opcua) against the tempering machine's server: what a
// SCADA sees. Prints one JSON line on stdout (node-opcua's own logging goes to stderr).
//
//     node tests/js/client.js '{"tools": ".npm-tools", "action": "certificate", "pki": DIR}'
//     node tests/js/client.js '{"tools": ..., "action": "session", "pki": DIR, "endpoint": URL,
//                               "serverCertificate": FILE, "user": NAME, "password": PW}'
//     node tests/js/client.js '{"tools": ..., "action": "scenario", "pki": DIR, "endpoint": URL,
//                               "serverCertificate": FILE, "passwords": {ROLE: PW, ...},
//                               "recipe": ID, "zone": "Pump", "goodTrim": 1.5, "badTrim": 5,
//                               "subscribeMs": 2000}'
//
// TOOLS (`.npm-tools`, filled by `make js-deps`) holds node_modules with node-opcua-client.
// Every connection is SignAndEncrypt with Basic256Sha256 and a user name and password; the
// client certificate is node-opcua's own, made on first use in the PKI folder DIR (its
// own/certs/client_certificate.pem; the "certificate" action makes it and prints its path, for
// the server to trust). The server's certificate FILE is put in the client's trusted list, and
// unknown server certificates are refused.
//
// - certificate: {certificate, applicationUri}
// - session: connect and log in as USER, read the server's state: {ok: true, serverState} or
//   {ok: false, stage: "connect" | "session", status: "Bad...", error}
// - scenario: as the users technician, operator and viewer: browse to the machine object, read
//   ZONE's Temperature with its EngineeringUnits and EURange, subscribe to it, write Trim
//   (goodTrim, then badTrim), call StartRecipe twice (the second while the batch runs), write
//   Trim as a viewer; every result as a StatusCode name.
"use strict";

const fs = require("node:fs");
const path = require("node:path");

const { quietConsole, load, statusName } = require("./common.js");

quietConsole();     // stdout carries our JSON only

const args = JSON.parse(process.argv[2] || "{}");
const TIME_LIMIT_MS = args.timeLimitMs || 45000;

function done(result, code = 0) {
    process.stdout.write(JSON.stringify(result) + "\n");
    process.exit(code);
}

setTimeout(() => done({ ok: false, stage: "time", error: `gave up after ${TIME_LIMIT_MS} ms` }, 1),
    TIME_LIMIT_MS).unref();

async function makeClient(ua) {
    const manager = new ua.OPCUACertificateManager({
        rootFolder: path.resolve(args.pki),
        automaticallyAcceptUnknownCertificate: false,
    });
    await manager.initialize();
    const options = {
        applicationName: "TemperingInteropClient",
        clientCertificateManager: manager,
        securityMode: ua.MessageSecurityMode.SignAndEncrypt,
        securityPolicy: ua.SecurityPolicy.Basic256Sha256,
        endpointMustExist: false,
        connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
        requestedSessionTimeout: 30000,
    };
    if (args.serverCertificate) {
        const der = fs.readFileSync(args.serverCertificate);
        await manager.trustCertificate(der);
        options.serverCertificate = der;
    }
    return { client: ua.OPCUAClient.create(options), manager };
}

function identity(ua, user, password) {
    return { type: ua.UserTokenType.UserName, userName: user, password };
}

async function certificate(ua) {
    const { client } = await makeClient(ua);
    await client.createDefaultCertificate();
    done({ certificate: client.certificateFile, applicationUri: client._getBuiltApplicationUri() });
}

async function session(ua) {
    const { client } = await makeClient(ua);
    try {
        await client.connect(args.endpoint);
    } catch (err) {
        done({ ok: false, stage: "connect", status: statusName(err), error: err.message });
    }
    let s;
    try {
        s = await client.createSession(identity(ua, args.user, args.password));
    } catch (err) {
        await client.disconnect().catch(() => {});
        done({ ok: false, stage: "session", status: statusName(err), error: err.message });
    }
    const dv = await s.read({ nodeId: ua.resolveNodeId("Server_ServerStatus_State"),
                              attributeId: ua.AttributeIds.Value });
    await s.close();
    await client.disconnect();
    done({ ok: true, serverState: dv.value.value });
}

// -- the scenario ------------------------------------------------------------------------------

async function children(ua, s, nodeId) {
    const r = await s.browse({
        nodeId, browseDirection: ua.BrowseDirection.Forward,
        referenceTypeId: "HierarchicalReferences", includeSubtypes: true,
        nodeClassMask: 0, resultMask: 63,
    });
    if (!r.statusCode.isGood()) throw new Error(`browse ${nodeId}: ${r.statusCode.name}`);
    return r.references.map((ref) => ({
        name: ref.browseName.name, ns: ref.browseName.namespaceIndex, nodeId: ref.nodeId,
        nodeClass: ua.NodeClass[ref.nodeClass],
    }));
}

async function child(ua, s, nodeId, name) {
    const found = (await children(ua, s, nodeId)).find((c) => c.name === name);
    if (!found) throw new Error(`no ${name} below ${nodeId.toString()}`);
    return found.nodeId;
}

async function value(ua, s, nodeId) {
    return s.read({ nodeId, attributeId: ua.AttributeIds.Value });
}

// a Variant's value as JSON: node-opcua gives a (U)Int64 as [high, low] 32-bit words
function plain(ua, variant) {
    const v = variant.value;
    const wide = variant.dataType === ua.DataType.UInt64 || variant.dataType === ua.DataType.Int64;
    return wide && Array.isArray(v) ? v[0] * 4294967296 + v[1] : v;
}

async function writeDouble(ua, s, nodeId, v) {
    try {
        const sc = await s.write({ nodeId, attributeId: ua.AttributeIds.Value,
                                   value: { value: { dataType: ua.DataType.Double, value: v } } });
        return sc.name;
    } catch (err) {            // a refused Write service (ServiceFault) rather than a refused value
        return statusName(err) || err.message;
    }
}

async function callString(ua, s, objectId, methodId, text) {
    try {
        const r = await s.call({ objectId, methodId,
                                 inputArguments: [{ dataType: ua.DataType.String, value: text }] });
        return r.statusCode.name;
    } catch (err) {
        return statusName(err) || err.message;
    }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function scenario(ua) {
    const out = {};
    const { client } = await makeClient(ua);
    await client.connect(args.endpoint);
    const pw = args.passwords;
    const tech = await client.createSession(identity(ua, "technician", pw.technician));

    // browse: Objects -> the machine (the object in a urn:open-tempering:machine: namespace)
    const nsArray = (await value(ua, tech, ua.resolveNodeId("Server_NamespaceArray"))).value.value;
    const objects = await children(ua, tech, ua.resolveNodeId("ObjectsFolder"));
    const machine = objects.find((c) => (nsArray[c.ns] || "").startsWith("urn:open-tempering:machine:"));
    if (!machine) throw new Error(`no machine object among ${objects.map((c) => c.name)}`);
    out.machine = { name: machine.name, namespaceUri: nsArray[machine.ns], nodeId: machine.nodeId.toString() };
    out.machineChildren = (await children(ua, tech, machine.nodeId)).map((c) => c.name).sort();
    const zones = await child(ua, tech, machine.nodeId, "Zones");
    out.zones = (await children(ua, tech, zones)).map((c) => c.name).sort();
    const zone = await child(ua, tech, zones, args.zone);
    const zoneChildren = await children(ua, tech, zone);
    out.zoneChildren = zoneChildren.map((c) => c.name).sort();
    const temperature = await child(ua, tech, zone, "Temperature");
    const trim = await child(ua, tech, zone, "Trim");
    out.temperatureChildren = (await children(ua, tech, temperature)).map((c) => c.name).sort();

    // read: the temperature, its unit and range
    const dv = await value(ua, tech, temperature);
    out.temperature = { value: dv.value.value, dataType: ua.DataType[dv.value.dataType],
                        status: dv.statusCode.name,
                        sourceTimestamp: dv.sourceTimestamp && dv.sourceTimestamp.toISOString() };
    const eu = (await value(ua, tech, await child(ua, tech, temperature, "EngineeringUnits"))).value.value;
    out.engineeringUnits = { displayName: eu.displayName.text, unitId: eu.unitId, namespaceUri: eu.namespaceUri };
    const range = (await value(ua, tech, await child(ua, tech, temperature, "EURange"))).value.value;
    out.euRange = { low: range.low, high: range.high };

    // subscribe: data changes of the temperature while the scan runs
    const sub = await tech.createSubscription2({
        requestedPublishingInterval: 100, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
        maxNotificationsPerPublish: 1000, publishingEnabled: true, priority: 1,
    });
    const diagnostics = await child(ua, tech, machine.nodeId, "Diagnostics");
    const scans = await child(ua, tech, await child(ua, tech, diagnostics, "Scan"), "Scans");
    out.dataChanges = {};
    for (const [key, nodeId] of [["temperature", temperature], ["scans", scans]]) {
        const changes = out.dataChanges[key] = [];
        const item = await sub.monitor({ nodeId, attributeId: ua.AttributeIds.Value },
            { samplingInterval: 100, discardOldest: true, queueSize: 10 }, ua.TimestampsToReturn.Both);
        item.on("changed", (d) => changes.push({
            value: plain(ua, d.value),
            status: d.statusCode.name,
            sourceTimestamp: d.sourceTimestamp && d.sourceTimestamp.toISOString() }));
    }
    await sleep(args.subscribeMs || 2000);
    await sub.terminate();

    // writes as a technician: a trim in range, then one out of range
    out.writeGoodTrim = await writeDouble(ua, tech, trim, args.goodTrim);
    out.trimAfterGood = (await value(ua, tech, trim)).value.value;
    out.writeBadTrim = await writeDouble(ua, tech, trim, args.badTrim);
    out.trimAfterBad = (await value(ua, tech, trim)).value.value;
    await tech.close();

    // methods as an operator: start the recipe, then start it again while its batch runs
    const op = await client.createSession(identity(ua, "operator", pw.operator));
    const sequencer = await child(ua, op, machine.nodeId, "Sequencer");
    const seqChildren = await children(ua, op, sequencer);
    const start = seqChildren.find((c) => c.name === "StartRecipe" && c.nodeClass === "Method");
    const phase = seqChildren.find((c) => c.name === "Phase").nodeId;
    out.phaseBefore = (await value(ua, op, phase)).value.value;
    out.startRecipe = await callString(ua, op, sequencer, start.nodeId, args.recipe);
    for (let i = 0; i < 50 && (await value(ua, op, phase)).value.value === out.phaseBefore; i++) {
        await sleep(100);
    }
    out.phaseAfter = (await value(ua, op, phase)).value.value;
    out.startRecipeAgain = await callString(ua, op, sequencer, start.nodeId, args.recipe);
    await op.close();

    // a viewer may read, not write
    const viewer = await client.createSession(identity(ua, "viewer", pw.viewer));
    out.viewerReadTrim = (await value(ua, viewer, trim)).statusCode.name;
    out.writeTrimAsViewer = await writeDouble(ua, viewer, trim, 0.5);
    out.trimAfterViewer = (await value(ua, viewer, trim)).value.value;
    await viewer.close();
    await client.disconnect();
    out.ok = true;
    done(out);
}

(async () => {
    const ua = await load(args.tools);
    const actions = { certificate, session, scenario };
    const action = actions[args.action];
    if (!action) done({ ok: false, stage: "args", error: `unknown action ${args.action}` }, 2);
    await action(ua);
})().catch((err) => done({ ok: false, stage: "run", status: statusName(err), error: err && err.stack }, 1));
