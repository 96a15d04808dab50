"""``tempering autotune ZONE...``: a zone's autotune on the machine's twin (virtual time) or on
the running machine over OPC UA (``--server``). The experiment, the identification and the
tuning rule are the PLC's (``plc.autotune``, ``plc.tuning``); this is their command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from plc.autotune import RUNNING_STAGES

from .cli import _load, _opcua_settings, _table, _write_atomic

AUTOTUNE_COLUMNS = ("zone", "status", "K K/%", "tau s", "dead s", "kp %/K", "(was)", "ki %/(K*s)",
                    "(was)", "kd %*s/K", "(was)", "overshoot K", "settling s", "Ms", "GM", "PM deg")
GAINS = ("kp", "ki", "kd")
CLI_URI = "urn:open-tempering:cli"          # the command line's OPC UA application
CLI_PKI = "cli"                             # its certificate: <opcua.data_dir>/cli/own


def _zone(text: str) -> str:
    """A zone by its name (pump, tank_bottom) or its OPC UA browse name (Pump, TankBottom)."""
    from plc.contract import ZONES                  # pure: the PLC process parses this command line

    names = {z: z for z in ZONES} | {"".join(p.capitalize() for p in z.split("_")): z for z in ZONES}
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown zone {text!r} (the zones: {', '.join(ZONES)})")
    return names[text]


def _amplitude(text: str) -> float:
    from plc.commands import AMPLITUDE_PCT

    lo, hi = AMPLITUDE_PCT
    try:
        pct = float(text)
    except ValueError:
        pct = float("nan")
    if not lo <= pct <= hi:
        raise argparse.ArgumentTypeError(f"expected an amplitude within {lo:g}..{hi:g} % of the "
                                         f"output range, got {text!r}")
    return pct


def _finite(x) -> float | None:
    """A figure for JSON: None where there is none (or it is not finite)."""
    import math

    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _outcome_row(zone: str, o) -> dict:
    """One zone's autotune outcome (``plc.autotune.Outcome``, or None) as plain data."""
    if o is None:
        return {"zone": zone, "status": "none", "message": "no outcome", "model": None, "gains": None,
                "previous": {}, "prediction": None}
    m, g, p = o.model, o.gains, o.prediction
    return {
        "zone": zone, "status": o.status, "message": o.message,
        "model": None if m is None else {
            "gain_k_per_pct": _finite(m.gain_k_per_pct), "tau_s": _finite(m.tau_s),
            "dead_s": _finite(m.dead_s), "rms_k": _finite(m.rms_k), "integrating": bool(m.integrating)},
        "gains": None if g is None else {"kp": _finite(g.kp), "ki": _finite(g.ki), "kd": _finite(g.kd)},
        "previous": {k: _finite(v) for k, v in dict(o.previous).items()},
        "prediction": None if p is None else {
            "overshoot_k": _finite(p.overshoot_k), "settling_s": _finite(p.settling_s),
            "load_peak_k": _finite(p.load_peak_k), "load_recovery_s": _finite(p.load_recovery_s),
            "ms": _finite(p.ms), "gain_margin": _finite(p.gain_margin),
            "phase_margin_deg": _finite(p.phase_margin_deg)}}


def _proposed(row: dict) -> bool:
    return row["status"] in ("proposed", "accepted") and row["gains"] is not None


def _autotune_report(rows: list[dict]) -> list[str]:
    """The outcomes as text: one table line a zone with a proposal, then why the others have none."""
    def f(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}g}"

    lines = _table(AUTOTUNE_COLUMNS, [
        (r["zone"], r["status"], f(r["model"]["gain_k_per_pct"], 4), f(r["model"]["tau_s"], 4),
         f(r["model"]["dead_s"], 3), f(r["gains"]["kp"], 4), f(r["previous"].get("kp"), 4),
         f(r["gains"]["ki"], 4), f(r["previous"].get("ki"), 4),
         f(r["gains"]["kd"], 4), f(r["previous"].get("kd"), 4),
         f(r["prediction"]["overshoot_k"], 2), f(r["prediction"]["settling_s"], 4),
         f(r["prediction"]["ms"], 3), f(r["prediction"]["gain_margin"], 3),
         f(r["prediction"]["phase_margin_deg"], 3))
        for r in rows if _proposed(r) and r["model"] and r["prediction"]])
    lines = lines if len(lines) > 1 else []
    lines += [f"{r['zone']}: {r['status']}: {r['message']}" for r in rows if not _proposed(r)]
    return lines


def _write_gains(path: Path, rows: list[dict]) -> str:
    """The proposed gains of ``rows`` written into the zones of the machine file ``path``
    (only those numbers change: comments and layout stay); '' or why it could not."""
    import yaml

    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    wanted = {r["zone"]: r["gains"] for r in rows if _proposed(r)}
    done: set[tuple[str, str]] = set()
    section = zone = None
    zone_indent = field_indent = -1
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, rest = stripped.partition(":")
        if indent == 0:
            section, zone, zone_indent = key if sep else None, None, -1
            continue
        if section != "zones" or not sep:
            continue
        if zone is None or indent <= zone_indent:
            zone, zone_indent, field_indent = key, indent, -1
            continue
        field_indent = indent if field_indent < 0 else field_indent
        gains = wanted.get(zone)
        if gains is not None and key in GAINS and indent == field_indent:
            value, hash_, comment = rest.partition("#")
            text = f"{gains[key]:.4g}"
            pad = " " * max(1, len(value) - len(text) - 1) if hash_ else ""
            lines[i] = f"{line[:indent]}{key}: {text}{pad}{hash_}{comment.rstrip()}\n"
            done.add((zone, key))
    missing = [f"zones.{z}.{k}" for z in wanted for k in GAINS if (z, k) not in done]
    if missing:
        return f"{path}: no {', '.join(missing)} to write"
    text = "".join(lines)
    data = yaml.safe_load(text)
    if any(data["zones"][z][k] != float(f"{g[k]:.4g}") for z, g in wanted.items() for k in GAINS):
        return f"{path}: the zones section has a layout this writer does not know"
    _write_atomic(path, text)
    return ""


def _autotune_twin(args, zones: list[str]) -> int:
    """``tempering autotune ZONE...``: on the machine's twin, in virtual time."""
    from plc.program import Program
    from twin.autotune import TwinAutotuneError, autotune

    loaded = _load(args.config)
    if loaded is None:
        return 1
    cfg, book = loaded
    recipe = args.recipe or cfg.machine.default_recipe
    if recipe not in book:
        print(f"tempering autotune: unknown recipe {recipe!r} (known: {', '.join(book.ids)})", file=sys.stderr)
        return 2
    if args.write and not Path(args.write).is_file():
        print(f"tempering autotune: --write {args.write}: no such machine file", file=sys.stderr)
        return 2
    print(f"autotune of {', '.join(zones)} on the twin of machine {cfg.machine.id} (recipe {recipe}, "
          f"virtual time; each proposal accepted before the next zone)", flush=True)
    program = Program.from_config(cfg, book)
    try:
        outcomes, _ = autotune(program, cfg.twin, zones, recipe_id=recipe, seed=args.seed,
                               amplitude_pct=args.amplitude)
    except TwinAutotuneError as e:
        print(f"tempering autotune: {e}", file=sys.stderr)
        return 1
    rows = [_outcome_row(z, outcomes.get(z)) for z in zones]
    print("\n".join(_autotune_report(rows)))
    ok = all(_proposed(r) for r in rows)
    if ok and not args.write:
        print("to use them: --write FILE (the machine file), or tune the machine itself: "
              "--server opc.tcp://HOST:PORT --user NAME")
    if args.write and any(_proposed(r) for r in rows):
        why = _write_gains(Path(args.write), rows)
        print(f"tempering autotune: {why}" if why else
              f"{args.write}: kp, ki and kd of {', '.join(r['zone'] for r in rows if _proposed(r))} written",
              file=sys.stderr if why else sys.stdout)
        ok = ok and not why
    if not ok:
        print("tempering autotune: not every zone got a proposal", file=sys.stderr)
    if args.json:
        print(json.dumps({"mode": "twin", "machine": cfg.machine.id, "recipe": recipe,
                          "amplitude_pct": args.amplitude, "ok": ok, "zones": {r["zone"]: r for r in rows}}))
    return 0 if ok else 1


def _cli_certificate(settings) -> tuple[Path, Path, str]:
    """The command line's client certificate and key (made on first use in
    ``<opcua.data_dir>/cli/own``), trusted by the server's PKI when it is here and writable
    (what ``tempering pki trust FILE`` does). Returns (certificate, key, a note or '')."""
    import os
    import socket

    from opcua_server.security import Pki, PkiError

    cert, key = Pki(Path(settings.data_dir) / CLI_PKI).ensure_own_certificate(CLI_URI, socket.gethostname())
    trusted = settings.pki_dir / "trusted"
    if not (trusted.is_dir() and os.access(trusted, os.W_OK)):
        return cert, key, (f"the server must trust this client's certificate {cert} (on the server's "
                           f"machine: tempering pki trust FILE)")
    try:
        Pki(settings.pki_dir).trust(cert)
    except PkiError as e:
        return cert, key, f"could not trust {cert} in {settings.pki_dir}: {e}"
    return cert, key, ""


class _AutotuneClient:
    """One zone's Autotune object on the running machine, through an asyncua client."""

    def __init__(self, client, ns: int, zone: str):
        from opcua_server.model import ROOT, ZONE_NODES

        self.client, self.zone = client, zone
        self.path = f"{ROOT}.Zones.{ZONE_NODES[zone]}.Autotune"
        self.ns = ns

    def node(self, name: str):
        from asyncua import ua

        return self.client.get_node(ua.NodeId(f"{self.path}.{name}", self.ns))

    async def call(self, method: str, *args) -> str:
        """The StatusCode's name of the call ('Good' if accepted)."""
        from asyncua import ua

        try:
            await self.client.get_node(ua.NodeId(self.path, self.ns)).call_method(
                ua.NodeId(f"{self.path}.{method}", self.ns), *args)
        except ua.UaStatusCodeError as e:
            return type(e).__name__
        return "Good"

    async def read(self, *names: str) -> dict:
        from asyncua import ua

        values = await self.client.read_attributes([self.node(n) for n in names], ua.AttributeIds.Value)
        return {n: (dv.Value.Value if dv.StatusCode.is_good() else None) for n, dv in zip(names, values)}

    async def changed(self, before: dict, timeout_s: float = 10.0) -> None:
        """Wait until Stage and Message differ from ``before`` (the window publishes the scan's
        answer a moment after it gave its verdict), at most ``timeout_s``."""
        for _ in range(int(timeout_s / 0.2)):
            if await self.read("Stage", "Message") != before:
                return
            await asyncio.sleep(0.2)

    async def row(self) -> dict:
        """The zone's last outcome as ``_outcome_row`` gives it."""
        v = await self.read("Stage", "Message", "ModelGain", "ModelTimeConstant", "ModelDeadTime",
                            "ModelIntegrating", "ProposedKp", "ProposedKi", "ProposedKd", "PreviousKp",
                            "PreviousKi", "PreviousKd", "PredictedOvershoot", "PredictedSettlingTime",
                            "PredictedMaxSensitivity", "PredictedGainMargin", "PredictedPhaseMargin")
        has = v["Stage"] in ("proposed", "accepted", "rejected")
        return {"zone": self.zone, "status": v["Stage"], "message": v["Message"],
                "model": {"gain_k_per_pct": v["ModelGain"], "tau_s": v["ModelTimeConstant"],
                          "dead_s": v["ModelDeadTime"], "integrating": v["ModelIntegrating"]} if has else None,
                "gains": {"kp": v["ProposedKp"], "ki": v["ProposedKi"], "kd": v["ProposedKd"]} if has else None,
                "previous": {"kp": v["PreviousKp"], "ki": v["PreviousKi"], "kd": v["PreviousKd"]},
                "prediction": {"overshoot_k": v["PredictedOvershoot"], "settling_s": v["PredictedSettlingTime"],
                               "ms": v["PredictedMaxSensitivity"], "gain_margin": v["PredictedGainMargin"],
                               "phase_margin_deg": v["PredictedPhaseMargin"]} if has else None}


async def _autotune_zone(z: _AutotuneClient, args, refused) -> dict | None:
    """Start, follow, then accept (or not) one zone's autotune; its outcome row, None if refused."""
    from asyncua import ua

    amplitude = ua.Variant(float(args.amplitude or 0.0), ua.VariantType.Double)
    before = await z.read("Stage", "Message")
    result = await z.call("Start", amplitude)
    if result != "Good":
        refused(f"Start of the autotune of {z.zone}", result)
        return None
    await z.changed(before)                 # not the last autotune's outcome
    shown = None
    try:
        while True:
            v = await z.read("Stage", "Progress", "Message")
            if (v["Stage"], round(v["Progress"] or 0.0)) != shown:
                shown = (v["Stage"], round(v["Progress"] or 0.0))
                print(f"{z.zone}: {v['Stage']} {shown[1]:3d} %  {v['Message']}", flush=True)
            if v["Stage"] not in RUNNING_STAGES + ("idle",):
                break
            await asyncio.sleep(1.0)
    except asyncio.CancelledError:          # Ctrl-C: the experiment must not outlive its operator
        print(f"{z.zone}: interrupted: aborting the autotune", file=sys.stderr)
        await z.call("Abort")
        raise
    row = await z.row()
    if row["status"] != "proposed":
        return row
    print("\n".join(_autotune_report([row])))
    accept = args.accept
    if not accept and sys.stdin.isatty():
        answer = await asyncio.to_thread(input, f"Accept the gains proposed for {z.zone}? [y/N] ")
        accept = answer.strip().lower() in ("y", "yes")
    if accept or sys.stdin.isatty():
        before = await z.read("Stage", "Message")
        result = await z.call("Accept" if accept else "Reject")
        if result != "Good":
            refused(f"{'Accept' if accept else 'Reject'} of {z.zone}'s proposal", result)
        elif accept:
            g = row["gains"]
            print(f"{z.zone}: accepted: kp {g['kp']:.4g} %/K, ki {g['ki']:.4g} %/(K*s), kd {g['kd']:.4g} %*s/K")
        else:
            print(f"{z.zone}: proposal rejected; the gains stay")
        await z.changed(before, 5.0)
        return await z.row()
    print(f"{z.zone}: the proposal is pending; accept it with: tempering autotune {z.zone} "
          f"--server {args.server} --user {args.user} --accept-pending")
    return row


async def _autotune_server_run(args, zones: list[str], settings, password: str) -> int:
    from asyncua import Client, ua
    from asyncua.crypto import security_policies

    from opcua_server.model import MACHINE_URI_PREFIX

    cert, key, note = _cli_certificate(settings)
    client = Client(args.server, timeout=10)
    client.application_uri = CLI_URI
    own = settings.pki_dir / "own" / "cert.der"        # the server's, when it is this machine's
    server_cert = str(own) if args.server == settings.endpoint and own.is_file() else None
    rows: list[dict] = []

    def refused(what: str, result: str) -> None:
        print(f"tempering autotune: {what} refused: {result}"
              + {"BadUserAccessDenied": f" ({args.user} is not a technician)",
                 "BadInvalidState": " (an autotune runs only while a batch heats, before tempering, "
                                    "with no trip latched, the zone in auto and no other autotune "
                                    "running; Accept and Reject only with a proposal pending)"}.get(result, ""),
              file=sys.stderr)
    try:
        await client.set_security(security_policies.SecurityPolicyBasic256Sha256, str(cert), str(key),
                                  server_certificate=server_cert, mode=ua.MessageSecurityMode.SignAndEncrypt)
        client.set_user(args.user)
        client.set_password(password)
        async with client:
            uris = await client.get_namespace_array()
            machines = [i for i, uri in enumerate(uris) if uri.startswith(MACHINE_URI_PREFIX)]
            if len(machines) != 1:
                print(f"tempering autotune: {args.server} serves {len(machines)} tempering machines",
                      file=sys.stderr)
                return 1
            for zone in zones:
                z = _AutotuneClient(client, machines[0], zone)
                if args.accept_pending or args.reject_pending:
                    method = "Accept" if args.accept_pending else "Reject"
                    before = await z.read("Stage", "Message")
                    result = await z.call(method)
                    if result != "Good":
                        refused(f"{method} of {zone}'s proposal (Stage {before['Stage']})", result)
                    else:
                        print(f"{zone}: proposal {'accepted' if args.accept_pending else 'rejected'}")
                        await z.changed(before, 5.0)
                    rows.append({**await z.row(), "ok": result == "Good"})
                    continue
                row = await _autotune_zone(z, args, refused)
                if row is None:
                    rows.append({"zone": zone, "status": "refused", "ok": False})
                    continue
                if not _proposed(row) and row["status"] != "rejected":
                    print(f"{zone}: {row['status']}: {row['message']}", file=sys.stderr)
                rows.append({**row, "ok": row["status"] in ("proposed", "accepted", "rejected")})
    except (OSError, asyncio.TimeoutError, ua.UaError) as e:
        why = type(e).__name__ if isinstance(e, ua.UaStatusCodeError) else (str(e) or type(e).__name__)
        print(f"tempering autotune: {args.server}: {why}" + (f"; {note}" if note else ""), file=sys.stderr)
        return 1
    ok = all(r["ok"] for r in rows)
    if args.json:
        print(json.dumps({"mode": "server", "server": args.server, "ok": ok,
                          "zones": {r["zone"]: r for r in rows}}))
    return 0 if ok else 1


def _autotune_server(args, zones: list[str]) -> int:
    """``tempering autotune ZONE... --server URL``: on the running machine, over OPC UA."""
    import os

    settings = _opcua_settings(args)
    if settings is None:
        return 1
    password = os.environ.get("TEMPERING_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            print("tempering autotune: no terminal to ask the password on; give it in the "
                  "environment variable TEMPERING_PASSWORD", file=sys.stderr)
            return 2
        import getpass
        password = getpass.getpass(f"password of {args.user} on {args.server}: ")
    try:
        return asyncio.run(_autotune_server_run(args, zones, settings, password))
    except KeyboardInterrupt:
        return 130


def cmd_autotune(args) -> int:
    zones = list(dict.fromkeys(args.zones))
    server_only = [o for o, v in (("--user", args.user), ("--accept", args.accept),
                                  ("--accept-pending", args.accept_pending),
                                  ("--reject-pending", args.reject_pending)) if v]
    twin_only = [o for o, v in (("--recipe", args.recipe), ("--write", args.write),
                                ("--seed", args.seed is not None)) if v]
    if args.server is None and server_only:
        print(f"tempering autotune: {', '.join(server_only)} only with --server URL", file=sys.stderr)
        return 2
    if args.server is not None:
        if twin_only:
            print(f"tempering autotune: {', '.join(twin_only)} only on the twin (without --server)",
                  file=sys.stderr)
            return 2
        if not args.user:
            print("tempering autotune: --server needs --user NAME (a technician)", file=sys.stderr)
            return 2
        if not args.server.startswith("opc.tcp://"):
            print(f"tempering autotune: --server: expected opc.tcp://HOST:PORT, got {args.server!r}",
                  file=sys.stderr)
            return 2
        return _autotune_server(args, zones)
    if args.seed is None:
        args.seed = 7
    return _autotune_twin(args, zones)


def add_parser(sub, where: argparse.ArgumentParser) -> None:
    """``tempering autotune ZONE... [--server URL]``."""
    x = sub.add_parser("autotune", parents=[where],
                       help="identify zones and propose PID gains: on the twin in virtual time, or "
                            "on the running machine (--server)")
    x.add_argument("zones", nargs="+", type=_zone, metavar="ZONE",
                   help="tank_bottom, tank_wall, pump, fountain (or TankBottom, ...)")
    x.add_argument("--recipe", metavar="ID", help="twin: the batch heated meanwhile (default: the machine's)")
    x.add_argument("--amplitude", type=_amplitude, metavar="PCT",
                   help="output amplitude of the relay and the step, 5..100 %% (default: the machine's)")
    x.add_argument("--seed", type=int, help="twin: its noise seed (default 7)")
    x.add_argument("--write", metavar="FILE",
                   help="twin: write the proposed kp, ki and kd into this machine file's zones")
    x.add_argument("--json", action="store_true", help="one JSON object last, every figure")
    x.add_argument("--server", metavar="URL", help="the running machine: opc.tcp://HOST:PORT")
    x.add_argument("--user", help="with --server: a technician (password: TEMPERING_PASSWORD, else asked)")
    g = x.add_mutually_exclusive_group()
    g.add_argument("--accept", action="store_true", help="with --server: accept the proposal without asking")
    g.add_argument("--accept-pending", action="store_true",
                   help="with --server: accept the proposal pending for the zones (no new autotune)")
    g.add_argument("--reject-pending", action="store_true",
                   help="with --server: reject the proposal pending for the zones (no new autotune)")
    x.set_defaults(func=cmd_autotune)
