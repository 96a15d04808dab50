// Loads the OPC UA standard nodeset plus NodeSet2 files of ours into a node-opcua address space
// (an implementation independent of asyncua) and prints, as one JSON line, the number of nodes
// in each namespace of ours and what node-opcua's loader reported.
//
//     node tests/js/load_nodeset.mjs TOOLS_DIR NAMESPACE_URI[,URI...] FILE.xml [FILE.xml ...]
//
// TOOLS_DIR holds node_modules with node-opcua-address-space and node-opcua-nodesets
// (`make js-deps` installs them into .npm-tools). Exit status 1 if loading fails.
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [toolsDir, uris, ...files] = process.argv.slice(2);
if (!toolsDir || !uris || files.length === 0) {
    console.error("usage: load_nodeset.mjs TOOLS_DIR NAMESPACE_URI[,URI...] FILE.xml [FILE.xml ...]");
    process.exit(2);
}
const require = createRequire(path.join(path.resolve(toolsDir), "package.json"));
const load = async (name) => import(pathToFileURL(require.resolve(name)).href);

// node-opcua reports problems of a nodeset on the console; keep them to report them as data
const messages = [];
for (const level of ["log", "warn", "error"]) {
    const original = console[level];
    console[level] = (...args) => { messages.push(args.map(String).join(" ")); if (level === "error") original(...args); };
}

const { AddressSpace } = await load("node-opcua-address-space");
const { generateAddressSpace } = await load("node-opcua-address-space/nodeJS.js");
const { nodesets } = await load("node-opcua-nodesets");

const addressSpace = AddressSpace.create();
try {
    await generateAddressSpace(addressSpace, [nodesets.standard, ...files.map((f) => path.resolve(f))]);
} catch (err) {
    process.stderr.write(`loading failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
}
const counts = {};
for (const uri of uris.split(",")) {
    const ns = addressSpace.getNamespaceIndex(uri) >= 0 ? addressSpace.getNamespace(uri) : null;
    counts[uri] = ns ? [...ns.nodeIterator()].length : -1;
}
process.stdout.write(JSON.stringify({ counts, messages }) + "\n");
addressSpace.dispose();
