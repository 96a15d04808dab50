"""The OPC UA server through a client of another stack: node-opcua (``tests/js/client.js``, run
with node as a subprocess) against a real TemperingServer of a PLC scanning in real time on the
in-process twin, on loopback, over SignAndEncrypt Basic256Sha256 with user names and passwords.

node-opcua makes its own client certificate (in a PKI folder of the test) and the test trusts it
in the server's PKI the way an administrator would (``Pki.trust`` of the file). What is checked is
what a SCADA of another vendor depends on: browsing to the machine, values with their
EngineeringUnits and EURange, data changes of a subscription, writes and method calls answered
with the StatusCodes of the gate (Good, BadOutOfRange, BadInvalidState, BadUserAccessDenied),
and the refusal of a wrong password and of an untrusted certificate.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from cryptography import x509

from machines import InProcessMachine
from opcua_server.security import thumbprint

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".npm-tools"
CLIENT = ROOT / "tests" / "js" / "client.js"
NODE_TIMEOUT_S = 40.0


def _tools_or_fail() -> str:
    """The node to run (the pinned one of .npm-tools where the system's is too old)."""
    pinned = TOOLS / "node_modules" / ".bin" / "node"
    node = str(pinned) if pinned.exists() else shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (Node.js is needed for the node-opcua interop tests)")
    if not (TOOLS / "node_modules" / "node-opcua-client" / "package.json").is_file():
        pytest.fail(f"node-opcua-client is not installed in {TOOLS} (make js-deps)")
    return node


async def node_client(**args) -> dict:
    """Run tests/js/client.js with ``args`` (JSON) and return the JSON line it prints last."""
    node = _tools_or_fail()
    proc = await asyncio.create_subprocess_exec(
        node, str(CLIENT), json.dumps({"tools": str(TOOLS), **args}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"node-opcua client {args.get('action')} did not finish in {NODE_TIMEOUT_S:g} s")
    lines = out.decode().strip().splitlines()
    assert lines, f"no output from the node-opcua client (exit {proc.returncode}): {err.decode()[-3000:]}"
    result = json.loads(lines[-1])
    result["_stderr"] = err.decode()[-3000:]
    return result


class Machine(InProcessMachine):
    """The PLC (real time, 100 ms scan) on the in-process twin at 40 °C and the OPC UA server,
    both in the test's event loop, over the bridge."""

    def __init__(self, opcua_pki):
        super().__init__(opcua_pki, seed=3, initial_temp_c=40.0)


async def js_certificate(pki_dir: Path) -> Path:
    """node-opcua's own client certificate, made in ``pki_dir``."""
    made = await node_client(action="certificate", pki=str(pki_dir))
    path = Path(made.get("certificate", ""))
    assert path.is_file(), made
    return path


@pytest.fixture
async def machine(opcua_pki):
    _tools_or_fail()
    async with Machine(opcua_pki) as m:
        yield m


async def test_node_opcua_browses_reads_subscribes_writes_and_calls(machine, opcua_pki, tmp_path):
    pki_dir = tmp_path / "node-opcua-pki"
    entry = opcua_pki.pki.trust(await js_certificate(pki_dir))
    assert entry.state == "trusted"

    r = await node_client(action="scenario", pki=str(pki_dir), endpoint=machine.endpoint,
                          serverCertificate=machine.server_certificate,
                          passwords={role: opcua_pki.password(role) for role in ("technician", "operator", "viewer")},
                          recipe=machine.cfg.machine.default_recipe, zone="Pump",
                          goodTrim=1.5, badTrim=5.0, subscribeMs=2000)
    assert r.get("ok"), r

    # browse: the machine object under Objects, in its own namespace, with the type's components
    assert r["machine"]["name"] == machine.cfg.machine.id
    assert r["machine"]["namespaceUri"] == f"urn:open-tempering:machine:{machine.cfg.machine.id}"
    assert {"Zones", "Sequencer", "Recipes", "Alarms", "Diagnostics"} <= set(r["machineChildren"])
    assert {"TankBottom", "TankWall", "Pump", "Fountain"} <= set(r["zones"])
    assert {"Temperature", "Setpoint", "Output", "Trim", "Mode"} <= set(r["zoneChildren"])
    assert {"EngineeringUnits", "EURange"} <= set(r["temperatureChildren"])

    # read: a Double in °C (UNECE CEL) with its range, good and recent, near the twin's 40 °C
    t = r["temperature"]
    assert t["status"] == "Good" and t["dataType"] == "Double" and 35.0 < t["value"] < 45.0
    assert r["engineeringUnits"]["unitId"] == 4408652          # CEL
    assert r["engineeringUnits"]["displayName"] in ("°C", "degC")
    assert r["engineeringUnits"]["namespaceUri"] == "http://www.opcfoundation.org/UA/units/un/cefact"
    assert r["euRange"]["low"] <= 0.0 and r["euRange"]["high"] >= 60.0

    # subscription (100 ms, for 2 s): the temperature's value, then its changes (the sensor reads
    # in steps of 0.1 K, so the twin at rest shows few), and the scan counter's (the scan's
    # statistics are refreshed every 10 scans: about one change a second)
    temps, scans = r["dataChanges"]["temperature"], r["dataChanges"]["scans"]
    assert temps and all(c["status"] == "Good" and 35.0 < c["value"] < 45.0 for c in temps), temps
    assert all(c["sourceTimestamp"] for c in temps), temps
    assert len(scans) >= 2 and all(c["status"] == "Good" for c in scans), scans
    counts = [c["value"] for c in scans]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts

    # writes of the technician: in range accepted and queued for the scan, out of range refused
    assert r["writeGoodTrim"] == "Good" and r["trimAfterGood"] == 1.5
    assert r["writeBadTrim"] == "BadOutOfRange" and r["trimAfterBad"] == 1.5
    assert machine.controller.state.trims.get("pump") == 1.5         # the scan took the command

    # methods of the operator: the recipe starts; starting it again while it runs is refused
    assert r["phaseBefore"] == 0 and r["startRecipe"] == "Good"
    assert r["phaseAfter"] != 0
    assert r["startRecipeAgain"] == "BadInvalidState"
    assert machine.controller.state.recipe_id == machine.cfg.machine.default_recipe

    # a viewer reads, and may not write
    assert r["viewerReadTrim"] == "Good"
    assert r["writeTrimAsViewer"] == "BadUserAccessDenied" and r["trimAfterViewer"] == 1.5

    # the gate recorded every request of the other stack's users
    audit = [(e["user"], e["target"], (e["result"] or "").split(":")[0])
             for e in opcua_pki.records.audit_entries(limit=1000)]
    for expected in (("technician", "pump.Trim", "Good"), ("technician", "pump.Trim", "BadOutOfRange"),
                     ("operator", "StartRecipe", "Good"), ("operator", "StartRecipe", "BadInvalidState")):
        assert expected in audit, audit


async def test_node_opcua_wrong_password_and_untrusted_certificate_are_refused(machine, opcua_pki, tmp_path):
    trusted_dir, untrusted_dir = tmp_path / "node-opcua-pki", tmp_path / "node-opcua-pki-untrusted"
    trusted, untrusted = await asyncio.gather(js_certificate(trusted_dir), js_certificate(untrusted_dir))
    opcua_pki.pki.trust(trusted)
    common = dict(endpoint=machine.endpoint, serverCertificate=machine.server_certificate)

    good, wrong, stranger = await asyncio.gather(
        node_client(action="session", pki=str(trusted_dir), user="operator",
                    password=opcua_pki.password("operator"), **common),
        node_client(action="session", pki=str(trusted_dir), user="operator", password="not-the-password", **common),
        node_client(action="session", pki=str(untrusted_dir), user="operator",
                    password=opcua_pki.password("operator"), **common))

    assert good.get("ok") and good["serverState"] == 0, good          # ServerState Running
    # node-opcua reports both as a failed session (CreateSession / ActivateSession) with the status
    assert (wrong.get("ok"), wrong.get("stage"), wrong.get("status")) == (
        False, "session", "BadUserAccessDenied"), wrong
    assert (stranger.get("ok"), stranger.get("stage"), stranger.get("status")) == (
        False, "session", "BadCertificateUntrusted"), stranger
    # the refused certificate is kept for an administrator to trust; trusted, it gets in
    rejected = [e for e in opcua_pki.pki.list() if e.state == "rejected"]
    assert [e.thumbprint for e in rejected] == [thumbprint(x509.load_pem_x509_certificate(untrusted.read_bytes()))]
    assert "TemperingInteropClient" in rejected[0].subject
    opcua_pki.pki.trust(rejected[0].thumbprint[:12])
    welcome = await node_client(action="session", pki=str(untrusted_dir), user="operator",
                                password=opcua_pki.password("operator"), **common)
    assert welcome.get("ok"), welcome
