// The machine's alarms through a Part 9 client of another stack (node-opcua's alarm and condition
// helpers): what an alarm display of another vendor does. One scenario, driven by the test:
//
//     node tests/js/alarms.js '{"tools": ".npm-tools", "pki": DIR, "endpoint": URL,
//                               "serverCertificate": FILE, "passwords": {ROLE: PW, ...},
//                               "alarm": "zone.pump.over_temp", "shelve": "zone.fountain.over_temp",
//                               "comment": TEXT, "shelveMs": 60000}'
//
// stdout carries JSON lines only (node-opcua's own logging goes to stderr):
//
//   {"step": "ready"}          subscribed and refreshed: the test now raises ALARM's condition
//   {"step": "acknowledged"}   ALARM seen active and acknowledged: the test now clears it
//   {"step": "done", "ok": true, ...every observation...}     or {"ok": false, "stage", "error"}
//
// Connection as in client.js: SignAndEncrypt Basic256Sha256, node-opcua's own client certificate
// in the PKI folder DIR (made beforehand by client.js's "certificate" action and trusted by the
// server), the server's certificate FILE trusted; a secure channel and a session per user.
//
// The operator: one subscription on the Server object (i=2253) with an event filter of
// constructEventFilter (the condition fields and ConditionId, OfType AlarmConditionType),
// ConditionRefresh (callConditionRefresh) up to its RefreshEndEvent (again once ALARM is active,
// and at the end), and node-opcua's current
// alarm display (installAlarmMonitoring: a ClientAlarmList fed by a subscription of its own with
// every field of AlarmConditionType, OfType AcknowledgeableConditionType, refreshed). When ALARM
// is active: a viewer's Acknowledge (acknowledgeCondition) is refused; the operator acknowledges
// through the ClientAlarm of the list (the EventId of the last event) with COMMENT; the EventId
// of the activation, now stale, is refused; once the test cleared it, ALARM returns to normal,
// leaves Retain and the list (purgeUnusedAlarms). The technician, on a subscription of its own:
// TimedShelve on SHELVE's ShelvingState (the method found by findMethodId), then Unshelve; both
// seen in the events. A last refresh no longer sends ALARM.
"use strict";

const fs = require("node:fs");
const path = require("node:path");

const { quietConsole, load, statusName } = require("./common.js");

quietConsole();     // stdout carries our JSON only

const args = JSON.parse(process.argv[2] || "{}");
const TIME_LIMIT_MS = args.timeLimitMs || 90000;
const WAIT_MS = args.waitMs || 20000;

function line(obj) {
    process.stdout.write(JSON.stringify(obj) + "\n");
}

function done(result, code = 0) {
    line(result);
    process.exit(code);
}

setTimeout(() => done({ ok: false, stage: "time", error: `gave up after ${TIME_LIMIT_MS} ms` }, 1),
    TIME_LIMIT_MS).unref();

// one secure channel per user: asyncua keeps one session per channel (a second CreateSession on a
// channel takes the place of the first, whose requests would then run as the second user)
async function connect(ua, manager, user) {
    const client = ua.OPCUAClient.create({
        applicationName: "TemperingInteropClient",       // the name of client.js's certificate
        clientCertificateManager: manager,
        securityMode: ua.MessageSecurityMode.SignAndEncrypt,
        securityPolicy: ua.SecurityPolicy.Basic256Sha256,
        serverCertificate: fs.readFileSync(args.serverCertificate),
        endpointMustExist: false,
        connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
        requestedSessionTimeout: 60000,
    });
    await client.connect(args.endpoint);
    const session = await client.createSession({ type: ua.UserTokenType.UserName, userName: user,
                                                 password: args.passwords[user] });
    return { client, session };
}

async function certificates(ua) {
    const manager = new ua.OPCUACertificateManager({
        rootFolder: path.resolve(args.pki), automaticallyAcceptUnknownCertificate: false,
    });
    await manager.initialize();
    await manager.trustCertificate(fs.readFileSync(args.serverCertificate));
    return manager;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(what, predicate) {
    const t0 = Date.now();
    for (;;) {
        const v = predicate();
        if (v) return v;
        if (Date.now() - t0 > WAIT_MS) throw new Error(`not within ${WAIT_MS} ms: ${what}`);
        await sleep(25);
    }
}

// -- events as JSON ------------------------------------------------------------------------------

const FIELDS = [
    "EventId", "EventType", "SourceNode", "SourceName", "Time", "ReceiveTime", "Message", "Severity",
    "ConditionName", "ConditionClassName", "BranchId", "Retain", "Quality", "LastSeverity",
    "EnabledState", "EnabledState.Id", "ActiveState", "ActiveState.Id", "AckedState", "AckedState.Id",
    "ConfirmedState.Id", "ShelvingState.CurrentState", "ShelvingState.LastTransition",
    "ShelvingState.UnshelveTime", "SuppressedOrShelved", "Comment", "ClientUserId", "ConditionId",
];

function plain(ua, variant) {
    if (!variant || variant.dataType === ua.DataType.Null) return null;
    const v = variant.value;
    if (v === null || v === undefined) return null;
    if (Buffer.isBuffer(v)) return v.toString("hex");
    if (v instanceof Date) return v.toISOString();
    if (v instanceof ua.NodeId) return v.toString();
    if (v instanceof ua.LocalizedText) return v.text === undefined ? null : v.text;
    if (v instanceof ua.StatusCode) return v.name;
    if (v && typeof v === "object" && typeof v.name === "string" && typeof v.value === "number") return v.name;
    return v;
}

function asJson(ua, fields, eventFields) {
    const out = {};
    fields.forEach((name, i) => { out[name] = plain(ua, eventFields[i]); });
    if (out.EventType === ua.resolveNodeId("RefreshStartEventType").toString()) out.marker = "RefreshStart";
    if (out.EventType === ua.resolveNodeId("RefreshEndEventType").toString()) out.marker = "RefreshEnd";
    return out;
}

// a subscription on the Server object with a Part 9 event filter; every event kept as JSON
async function watch(ua, session) {
    const sub = await session.createSubscription2({
        requestedPublishingInterval: 100, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
        maxNotificationsPerPublish: 1000, publishingEnabled: true, priority: 1,
    });
    const filter = ua.constructEventFilter(FIELDS, ua.ofType("AlarmConditionType"));
    const item = await sub.monitor(
        { nodeId: ua.resolveNodeId("Server"), attributeId: ua.AttributeIds.EventNotifier },
        { samplingInterval: 0, discardOldest: false, queueSize: 1000, filter },
        ua.TimestampsToReturn.Both);
    const events = [];
    item.on("changed", (eventFields) => events.push(asJson(ua, FIELDS, eventFields)));
    return { sub, item, events, of: (name) => events.filter((e) => e.ConditionName === name) };
}

async function refresh(ua, session, w) {
    const from = w.events.length;
    const status = await ua.callConditionRefresh(session, w.sub.subscriptionId);
    await waitFor("RefreshEndEvent", () => w.events.slice(from).some((e) => e.marker === "RefreshEnd"));
    const got = w.events.slice(from);
    const start = got.findIndex((e) => e.marker === "RefreshStart");
    const end = got.findIndex((e) => e.marker === "RefreshEnd");
    const between = got.slice(start + 1, end);
    return { status: status.name, markers: got.filter((e) => e.marker).map((e) => e.marker),
             conditions: between.map((e) => e.ConditionName), eventIds: between.map((e) => e.EventId) };
}

async function children(ua, s, nodeId) {
    const r = await s.browse({ nodeId, browseDirection: ua.BrowseDirection.Forward,
                               referenceTypeId: "HierarchicalReferences", includeSubtypes: true,
                               nodeClassMask: 0, resultMask: 63 });
    if (!r.statusCode.isGood()) throw new Error(`browse ${nodeId}: ${r.statusCode.name}`);
    return r.references;
}

async function child(ua, s, nodeId, name) {
    const found = (await children(ua, s, nodeId)).find((c) => c.browseName.name === name);
    if (!found) throw new Error(`no ${name} below ${nodeId.toString()}`);
    return found.nodeId;
}

// Objects -> the machine (its namespace is urn:open-tempering:machine:...) -> Alarms -> NAME
async function conditionNode(ua, s, name) {
    const nsArray = (await s.read({ nodeId: ua.resolveNodeId("Server_NamespaceArray"),
                                    attributeId: ua.AttributeIds.Value })).value.value;
    const machine = (await children(ua, s, ua.resolveNodeId("ObjectsFolder")))
        .find((c) => (nsArray[c.browseName.namespaceIndex] || "").startsWith("urn:open-tempering:machine:"));
    if (!machine) throw new Error("no machine object below Objects");
    return child(ua, s, await child(ua, s, machine.nodeId, "Alarms"), name);
}

async function call(ua, s, objectId, methodName, inputArguments = []) {
    const found = await ua.findMethodId(s, objectId, methodName);
    if (!found.methodId) return `no method ${methodName}: ${found.err && found.err.message}`;
    try {
        return (await s.call({ objectId, methodId: found.methodId, inputArguments })).statusCode.name;
    } catch (err) {
        return statusName(err) || err.message;
    }
}

async function acknowledge(ua, s, conditionId, eventIdHex, comment) {
    try {
        return (await ua.acknowledgeCondition(s, conditionId, Buffer.from(eventIdHex, "hex"), comment)).name;
    } catch (err) {
        return statusName(err) || err.message;
    }
}

// -- the scenario ----------------------------------------------------------------------------------

const out = {};        // every observation so far (also on a failure)

async function scenario(ua) {
    const alarm = args.alarm;
    const manager = await certificates(ua);
    const users = {};
    for (const user of ["operator", "technician", "viewer"]) users[user] = await connect(ua, manager, user);
    const [op, tech, viewer] = ["operator", "technician", "viewer"].map((u) => users[u].session);

    // the operator's event view and current alarm display, both in sync with the server
    const w = await watch(ua, op);
    out.firstRefresh = await refresh(ua, op, w);
    const display = await ua.installAlarmMonitoring(op);
    const deleted = [];
    display.on("alarmDeleted", (a) => deleted.push(a.fields.conditionName && a.fields.conditionName.value));
    const t = await watch(ua, tech);
    line({ step: "ready" });

    // the test raises the alarm: active, retained, unacknowledged
    const active = await waitFor(`${alarm} active`, () => w.of(alarm).find((e) => e["ActiveState.Id"]));
    out.active = active;
    out.activeRefresh = await refresh(ua, op, w);          // now it is retained: sent again
    const conditionId = ua.resolveNodeId(active.ConditionId);
    const shown = await waitFor(`${alarm} in the alarm display`, () => display.alarms().find(
        (a) => a.conditionId.toString() === active.ConditionId && a.eventId.toString("hex") === active.EventId));
    out.displayActive = { retain: shown.getRetain(), activeState: shown.fields.activeState.id.value,
                          ackedState: shown.fields.ackedState.id.value, severity: shown.fields.severity.value,
                          eventType: shown.eventType.toString(), count: display.length };

    // a viewer may not acknowledge; the operator acknowledges the last event with a comment
    out.viewerAcknowledge = await acknowledge(ua, viewer, conditionId, active.EventId, "viewer");
    out.acknowledge = (await shown.acknowledge(op, args.comment)).name;
    out.acknowledgedEventId = active.EventId;
    const acked = await waitFor(`${alarm} acknowledged`, () => w.of(alarm).find((e) => e["AckedState.Id"]));
    out.acked = acked;
    // the activation's EventId is stale now
    out.staleAcknowledge = await acknowledge(ua, op, conditionId, active.EventId, "stale");
    out.ackedInDisplay = await waitFor(`${alarm} acknowledged in the display`, () => {
        const a = display.alarms().find((x) => x.conditionId.toString() === active.ConditionId);
        return a && a.fields.ackedState.id.value ? { comment: a.fields.comment.value.text,
                                                     clientUserId: a.fields.clientUserId.value } : null;
    });
    line({ step: "acknowledged" });

    // the test clears it: back to normal, no longer retained, gone from the display
    out.normal = await waitFor(`${alarm} back to normal`,
        () => w.of(alarm).find((e) => !e["ActiveState.Id"] && e.Retain === false));
    await waitFor(`${alarm} not retained in the display`, () => display.alarms().some(
        (a) => a.conditionId.toString() === active.ConditionId && a.getRetain() === false));
    display.purgeUnusedAlarms();
    out.removedFromDisplay = deleted;
    out.displayAfter = display.alarms().map((a) => a.fields.conditionName && a.fields.conditionName.value);

    // the technician shelves another condition for a while, then unshelves it
    const shelveNode = await conditionNode(ua, tech, args.shelve);
    const shelvingState = await child(ua, tech, shelveNode, "ShelvingState");
    out.operatorShelve = await call(ua, op, shelvingState, "TimedShelve",
                                    [{ dataType: ua.DataType.Double, value: args.shelveMs }]);
    out.timedShelve = await call(ua, tech, shelvingState, "TimedShelve",
                                 [{ dataType: ua.DataType.Double, value: args.shelveMs }]);
    out.shelved = await waitFor(`${args.shelve} shelved`,
        () => t.of(args.shelve).find((e) => e["ShelvingState.CurrentState"] === "TimedShelved"));
    out.unshelve = await call(ua, tech, shelvingState, "Unshelve");
    out.unshelved = await waitFor(`${args.shelve} unshelved`, () => t.of(args.shelve).find(
        (e) => e["ShelvingState.CurrentState"] === "Unshelved" && e.EventId !== out.shelved.EventId));
    out.unshelveAgain = await call(ua, tech, shelvingState, "Unshelve");

    // a last refresh: the alarm is no longer retained
    out.lastRefresh = await refresh(ua, op, w);
    out.operatorEvents = w.events;
    out.technicianEvents = t.events;

    await ua.uninstallAlarmMonitoring(op);
    for (const { client, session } of Object.values(users)) {
        await session.close();
        await client.disconnect();
    }
    out.step = "done";
    out.ok = true;
    done(out);
}

(async () => {
    const ua = await load(args.tools);
    await scenario(ua);
})().catch((err) => done({ ...out, ok: false, stage: "run", status: statusName(err), error: err && err.stack }, 1));
