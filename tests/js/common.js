// What the node-opcua scripts of the tests (client.js, alarms.js) share: node-opcua's console
// logging sent to stderr (stdout carries the scripts' JSON lines only), node-opcua-client loaded
// from the pinned tools folder (`make js-deps`: .npm-tools), and a StatusCode's name from an error.
"use strict";

const { createRequire } = require("node:module");
const path = require("node:path");
const { pathToFileURL } = require("node:url");

function quietConsole() {
    for (const level of ["log", "info", "warn"]) {
        console[level] = (...args) => process.stderr.write(args.map(String).join(" ") + "\n");
    }
}

async function load(toolsDir) {
    const tools = createRequire(path.join(path.resolve(toolsDir), "package.json"));
    const clientMain = tools.resolve("node-opcua-client");
    const client = await import(pathToFileURL(clientMain).href);
    const beside = createRequire(clientMain);
    const cm = await import(pathToFileURL(beside.resolve("node-opcua-certificate-manager")).href);
    return { ...client, OPCUACertificateManager: cm.OPCUACertificateManager };
}

function statusName(err) {
    const m = /\b(Bad[A-Za-z]+)\b/.exec(err && (err.message || String(err)));
    return m ? m[1] : "";
}

module.exports = { quietConsole, load, statusName };
