"""Every client write and method call: who, may they, is it valid — then a command, and a record.

One job: turn OPC UA requests into PLC commands, or refuse them with the right StatusCode and
change nothing. The checks, in order, for each written value or method call:

0. Password change (``opcua_server.security.password_change_pending``): a session whose user
   must set a new password first (OPC UA Part 18 §5.2.8) may write nothing and call nothing but
   ``security.callable_before_change`` (ChangePassword, ConditionRefresh): every other write or
   call, to any node or method, with or without a rule, is refused with ``BadUserAccessDenied``,
   "password change required", and recorded. Checked here only, for the whole Write or Call
   request (``write``, ``call``).
1. Role (``opcua_server.security.role_allows``): viewer < operator < technician < admin;
   refused with ``BadUserAccessDenied``.
2. Type: the Variant must carry the variable's type (Double, String, Boolean);
   ``BadTypeMismatch``.
3. Range: ``BadOutOfRange`` (trim ±2 K, outputs ±100 %, gains 0..1000, recipe rules, an
   autotune's amplitude 0 or 5..100 %).
4. State: the scan's own verdict. The command goes to the PLC process (``plc.bridge``) with
   an id, the user and the origin, and the gate waits for the scan's answer: refused is
   ``BadInvalidState`` with the scan's reason; no PLC connected ``BadNoCommunication``; no
   verdict in time ``BadTimeout``. What only the window knows (a recipe a running batch uses,
   a manual output while the zone is in auto, as the last snapshot shows) is refused before.

An accepted write updates the variable once the scan has accepted the command. Every request,
accepted or not, is recorded in the audit trail: user, node or method, old value, new value,
result (the scan's verdict), time, and the command's id and origin; the clients get the same
as an OPC UA audit event (``announce``), the scan's reason in its Message. ``Gate.command`` is
the one path for every command of the window: OPC UA, the live view's keys, the auto-start.

asyncua 2.1 gives a method callback no session: the caller comes from
``opcua_server.security.current_user`` (set by the service ruleset before each request).
``install`` replaces the attribute service's ``write`` so that writes pass through
``Gate.write``, and the method service's ``call`` (``Gate.call``: check 0, then asyncua's own
call of each method); the server's own internal writes go the usual way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from asyncua import ua
from asyncua.crypto.permission_rules import UserRole

from plc.bridge import PlcTimeout, PlcUnavailable
from plc.commands import (AMPLITUDE_PCT, Abort, AbortAutotune, AcceptTuning, Acknowledge, Command,
                          Hold, RejectTuning, Reset, Resume, SetManual, SetTrim, SetTuning,
                          StartAutotune, StartRecipe, Stop)

from .security import PASSWORD_CHANGE_REQUIRED, callable_before_change, password_change_pending, role_allows
from .security import current_user as session_user

log = logging.getLogger(__name__)

SC = ua.StatusCodes


class Refused(Exception):
    def __init__(self, code: int, message: str, cmd: Command | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.cmd = cmd          # the command sent, when the refusal is the scan's verdict


@dataclass(frozen=True)
class WriteRule:
    """What a writable variable means: the role it needs, its type, and how a value becomes a
    command (``to_command`` raises Refused for an out-of-range or invalid value)."""

    role: str
    vtype: ua.VariantType
    to_command: Callable[[Any], Command | None]
    target: str
    after: Callable[[Any], Any] | None = None        # e.g. persist a recipe (may be async); may raise Refused


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise Refused(SC.BadOutOfRange, f"not a finite number: {v!r}")
    return float(v)


def within(lo: float, hi: float, what: str) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        x = _number(v)
        if not lo <= x <= hi:
            raise Refused(SC.BadOutOfRange, f"{what} must be within {lo:g}..{hi:g} (got {x:g})")
        return x
    return check


class Gate:
    """``plc``: the window's ``plc.bridge.PlcClient`` (``command``, ``latest``)."""

    def __init__(self, server, plc, records, *, wall: Callable[[], float] = time.time,
                 announce: Callable[..., Any] | None = None):
        """``announce(action, user, target, result, cmd)``: tells the clients (an OPC UA audit
        event) what became of a command, with the scan's reason."""
        self.server = server
        self.plc = plc
        self.announce = announce
        self.records = records
        self.wall = wall
        self.rules: dict[ua.NodeId, WriteRule] = {}
        self._original_write = None
        self._original_call = None

    # -- users ------------------------------------------------------------------------------

    def role_of(self, user) -> tuple[str, str]:
        """(name, role) of an asyncua session user; anonymous sessions are viewers."""
        name = getattr(user, "name", None) or "anonymous"
        role = getattr(user, "tempering_role", None)
        if role is None and name != "anonymous" and self.records is not None:
            role = self.records.role_of(name)
        return name, role or "viewer"

    async def _audit(self, user: str, action: str, target: str, old: Any, new: Any, result: str,
                     cmd: Command | None = None) -> None:
        """One audit row, written off the event loop (the database may be a PostgreSQL across
        the network)."""
        if self.records is None:
            return
        try:
            await asyncio.to_thread(self.records.audit, user, action, target,
                                    "" if old is None else str(old), "" if new is None else str(new),
                                    result, self.wall(), command_id=cmd.id if cmd else "",
                                    origin=cmd.origin if cmd else "")
        except Exception:
            log.exception("audit record of %s %s by %s", action, target, user)
        if self.announce is not None and (cmd is not None or action == "call"):
            try:
                await self.announce(action, user, target, result, cmd)
            except Exception:
                log.exception("audit event of %s %s by %s", action, target, user)

    async def submit(self, cmd: Command) -> Command:
        """Send ``cmd`` to the scan and wait for its verdict; Refused with the scan's reason
        (or why there was no verdict). Returns the command as sent (with its id)."""
        try:
            cmd, verdict = await self.plc.command(cmd)
        except PlcUnavailable as e:
            raise Refused(SC.BadNoCommunication, f"the PLC is not reachable: {e}", cmd) from None
        except PlcTimeout as e:
            raise Refused(SC.BadTimeout, str(e), cmd) from None
        if not verdict.accepted:
            # the scan names a Part 4/9 status code for some refusals (BadEventIdUnknown, ...)
            code = getattr(SC, getattr(verdict, "code", "") or "BadInvalidState", SC.BadInvalidState)
            raise Refused(code, verdict.reason, cmd)
        return cmd

    async def command(self, cmd: Command, target: str | None = None) -> tuple[bool, str]:
        """The path of a command that is not an OPC UA request (the live view's keys, the
        auto-start): sent with its user and origin, its verdict audited. Returns (accepted,
        the verdict's text)."""
        cmd = replace(cmd, id=cmd.id or self.plc.new_id())
        target = target or cmd.name
        try:
            cmd = await self.submit(cmd)
        except Refused as r:
            await self._audit(cmd.user, "command", target, None, _arguments(cmd),
                              ua.StatusCode(r.code).name + ": " + r.message, cmd)
            return False, r.message
        await self._audit(cmd.user, "command", target, None, _arguments(cmd), "Good", cmd)
        return True, "accepted"

    # -- writes -----------------------------------------------------------------------------

    def add_rule(self, node, rule: WriteRule) -> None:
        self.rules[node.nodeid] = rule

    async def write(self, params: ua.WriteParameters, user=None) -> list[ua.StatusCode]:
        if _internal(user):    # the server's own writes (status, diagnostics): asyncua's path
            return await self._original_write(params, user=user)
        results: list[ua.StatusCode] = []
        if password_change_pending(user):
            for wv in params.NodesToWrite:
                rule = self.rules.get(wv.NodeId)
                value = wv.Value.Value.Value if wv.Value is not None and wv.Value.Value is not None else None
                results.append(await self._before_password_change(
                    user, "write", rule.target if rule is not None else str(wv.NodeId), value))
            return results
        for wv in params.NodesToWrite:
            rule = self.rules.get(wv.NodeId)
            if rule is None or wv.AttributeId != ua.AttributeIds.Value:
                # only the variables with a rule are writable, and only their value
                name, _ = self.role_of(user)
                results.append(ua.StatusCode(SC.BadNotWritable))
                await self._audit(name, "write", str(wv.NodeId), None, None, "BadNotWritable")
                continue
            results.append(await self._write_one(wv, rule, user))
        return results

    async def _write_one(self, wv: ua.WriteValue, rule: WriteRule, user) -> ua.StatusCode:
        name, role = self.role_of(user)
        cmd = None
        variant = wv.Value.Value if wv.Value is not None else None
        value = None if variant is None else variant.Value
        try:
            old = await self.server.get_node(wv.NodeId).read_value()
        except ua.UaStatusCodeError:      # not published yet
            old = None
        try:
            if not role_allows(role, rule.role):
                raise Refused(SC.BadUserAccessDenied, f"{name} ({role}) may not write {rule.target}; "
                                                     f"needs {rule.role}")
            if variant is None or variant.VariantType != rule.vtype:
                got = variant.VariantType.name if variant is not None else "nothing"
                raise Refused(SC.BadTypeMismatch, f"{rule.target} takes {rule.vtype.name}, got {got}")
            cmd = rule.to_command(value)
            if cmd is not None:
                cmd = replace(cmd, user=name, origin="opcua", id=self.plc.new_id())
            if rule.after is not None:
                done = rule.after(value)
                if done is not None and hasattr(done, "__await__"):
                    await done
            if cmd is not None:
                cmd = await self.submit(cmd)
            dv = ua.DataValue(ua.Variant(value, rule.vtype), SourceTimestamp=wv.Value.SourceTimestamp,
                              ServerTimestamp=wv.Value.ServerTimestamp)
            await self.server.write_attribute_value(wv.NodeId, dv)
        except Refused as r:
            await self._audit(name, "write", rule.target, old, value,
                              ua.StatusCode(r.code).name + ": " + r.message, r.cmd or cmd)
            log.info("write of %s by %s refused: %s", rule.target, name, r.message)
            return ua.StatusCode(r.code)
        except Exception as e:          # never BadUnexpectedError for a bad value
            await self._audit(name, "write", rule.target, old, value, f"BadInternalError: {e}", cmd)
            log.exception("write of %s by %s", rule.target, name)
            return ua.StatusCode(SC.BadInternalError)
        await self._audit(name, "write", rule.target, old, value, "Good", cmd)
        return ua.StatusCode(SC.Good)

    async def _before_password_change(self, user, action: str, target: str, new: Any) -> ua.StatusCode:
        """Check 0's refusal of one write or call, recorded."""
        name, _ = self.role_of(user)
        await self._audit(name, action, target, None, new, f"BadUserAccessDenied: {PASSWORD_CHANGE_REQUIRED}")
        log.info("%s of %s by %s refused: %s", action, target, name, PASSWORD_CHANGE_REQUIRED)
        return ua.StatusCode(SC.BadUserAccessDenied)

    # -- methods -----------------------------------------------------------------------------

    async def call(self, methods: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        """The method service's ``call``: check 0, then asyncua's own call of each method (whose
        callbacks check the role: ``method``)."""
        user = session_user()
        if not password_change_pending(user):
            return await self._original_call(methods)
        results = []
        for m in methods:
            if callable_before_change(m.MethodId):
                results.extend(await self._original_call([m]))
                continue
            values = [a.Value if isinstance(a, ua.Variant) else a for a in m.InputArguments or []]
            code = await self._before_password_change(user, "call", await self._method_name(m), values)
            results.append(ua.CallMethodResult(StatusCode=code, OutputArguments=[]))
        return results

    async def _method_name(self, m: ua.CallMethodRequest) -> str:
        """``<object>.<method>`` by their browse names (the NodeIds where unknown)."""
        names = []
        for nodeid in (m.ObjectId, m.MethodId):
            try:
                names.append((await self.server.get_node(nodeid).read_browse_name()).Name)
            except Exception:
                names.append(str(nodeid))
        return ".".join(names)

    def method(self, target: str | Callable[[ua.NodeId], str], role: str, handler: Callable[..., Any],
               *, with_object: bool = False) -> Callable:
        """An asyncua method callback that checks the caller's role, runs ``handler(user,
        *args)`` (``handler(user, object_id, *args)`` ``with_object``; it returns output
        arguments, or a Command that was sent and accepted, or raises Refused) and records the
        call. ``target`` names the call in the audit, or makes the name from the object id."""
        async def callback(parent, *args):
            user = session_user()
            name, user_role = self.role_of(user)
            values = [a.Value if isinstance(a, ua.Variant) else a for a in args]
            what = target(parent) if callable(target) else target
            cmd = None
            try:
                if not role_allows(user_role, role):
                    raise Refused(SC.BadUserAccessDenied, f"{name} ({user_role}) may not call "
                                                         f"{what}; needs {role}")
                out = handler(name, parent, *values) if with_object else handler(name, *values)
                if hasattr(out, "__await__"):
                    out = await out
                if isinstance(out, Command):
                    cmd, out = out, []
            except Refused as r:
                await self._audit(name, "call", what, None, values,
                                  ua.StatusCode(r.code).name + ": " + r.message, r.cmd)
                log.info("call of %s by %s refused: %s", what, name, r.message)
                return ua.CallMethodResult(StatusCode=ua.StatusCode(r.code), OutputArguments=[])
            except TypeError as e:       # wrong number of arguments
                await self._audit(name, "call", what, None, values, f"BadArgumentsMissing: {e}")
                return ua.CallMethodResult(StatusCode=ua.StatusCode(SC.BadArgumentsMissing))
            except Exception as e:
                await self._audit(name, "call", what, None, values, f"BadInternalError: {e}")
                log.exception("call of %s by %s", what, name)
                return ua.CallMethodResult(StatusCode=ua.StatusCode(SC.BadInternalError))
            await self._audit(name, "call", what, None, values, "Good", cmd)
            return list(out or [])
        return callback

    def command_method(self, target: str, role: str, make: Callable[..., Command]) -> Callable:
        """A method that sends one command, made from its arguments by ``make`` (which raises
        Refused for a bad one: type, then range), and returns the scan's verdict."""
        async def handler(user: str, *args):
            return await self.submit(replace(make(*args), user=user, origin="opcua",
                                             id=self.plc.new_id()))
        return self.method(target, role, handler)

    # -- wiring into asyncua -------------------------------------------------------------------

    def install(self) -> None:
        attr = self.server.iserver.attribute_service
        if self._original_write is None:
            self._original_write = attr.write
        attr.write = self.write
        methods = self.server.iserver.method_service
        if self._original_call is None:
            self._original_call = methods.call
        methods.call = self.call


def _internal(user) -> bool:
    """The server's internal session (asyncua's admin user), not a client: clients always come
    through ``TemperingUserManager`` and carry a ``tempering_role``."""
    return user is not None and getattr(user, "tempering_role", None) is None \
        and getattr(user, "role", None) == UserRole.Admin


def _arguments(cmd: Command) -> str:
    """A command's own fields, for the audit trail."""
    skip = {"user", "id", "origin"}
    return ", ".join(f"{f}={getattr(cmd, f)!r}" for f in cmd.__slots__ if f not in skip)


def _string(v: Any, target: str) -> str:
    if not isinstance(v, str):
        raise Refused(SC.BadTypeMismatch, f"{target}: expected a String argument")
    return v


# the sequencer's methods: (least role, the command from the arguments)
COMMANDS = {
    "StartRecipe": ("operator", lambda rid: StartRecipe(_string(rid, "StartRecipe"))),
    "Stop": ("operator", lambda: Stop()),
    "Hold": ("operator", lambda: Hold()),
    "Resume": ("operator", lambda: Resume()),
    "Abort": ("operator", lambda: Abort()),
    "ResetTrips": ("operator", lambda: Reset()),
    "AcknowledgeAll": ("operator", lambda: Acknowledge(None)),
}


def amplitude_pct(v: Any) -> float | None:
    """Autotune Start's AmplitudePct: a Double, 0 for the machine's default (None) or within
    ``plc.commands.AMPLITUDE_PCT``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Refused(SC.BadTypeMismatch, f"AmplitudePct takes a Double, got {type(v).__name__}")
    x = _number(v)
    lo, hi = AMPLITUDE_PCT
    if x != 0.0 and not lo <= x <= hi:
        raise Refused(SC.BadOutOfRange, f"AmplitudePct must be 0 (the machine's default) or within "
                                        f"{lo:g}..{hi:g} % (got {x:g})")
    return x or None


def autotune_commands(zone: str) -> dict[str, tuple[str, Callable[..., Command]]]:
    """The methods of a zone's Autotune object: (least role, the command from the arguments)."""
    return {"Start": ("technician", lambda amplitude: StartAutotune(zone, amplitude_pct(amplitude))),
            "Abort": ("technician", lambda: AbortAutotune(zone)),
            "Accept": ("technician", lambda: AcceptTuning(zone)),
            "Reject": ("technician", lambda: RejectTuning(zone))}


def zone_rules(zone: str, plc) -> dict[str, WriteRule]:
    """The writable variables of a zone and their commands (``plc.latest``: the last snapshot)."""
    def view():
        snap = plc.latest
        return next((z for z in snap.zones if z.name == zone), None) if snap is not None else None

    def manual_output(v):
        x = within(-100, 100, "ManualOutput")(v)
        z = view()
        if z is None or not z.manual:
            raise Refused(SC.BadInvalidState, f"zone {zone} is in auto: write Mode 'manual' first")
        return SetManual(zone, x)

    def mode(v):
        if v not in ("auto", "manual"):
            raise Refused(SC.BadOutOfRange, f"Mode is 'auto' or 'manual' (got {v!r})")
        if v == "auto":
            return SetManual(zone, None)
        z = view()          # bumpless: manual starts from the output the loop gives now
        return SetManual(zone, float(z.output_pct) if z is not None else 0.0)

    tune = {g: (lambda g: lambda v: SetTuning(zone, **{g: within(0, 1000, g)(v)}))(g)
            for g in ("kp", "ki", "kd")}
    return {
        "Trim": WriteRule("technician", ua.VariantType.Double,
                          lambda v: SetTrim(zone, within(-2, 2, "Trim")(v)), f"{zone}.Trim"),
        "Mode": WriteRule("technician", ua.VariantType.String, mode, f"{zone}.Mode"),
        "ManualOutput": WriteRule("technician", ua.VariantType.Double, manual_output,
                                  f"{zone}.ManualOutput"),
        "Kp": WriteRule("technician", ua.VariantType.Double, tune["kp"], f"{zone}.Kp"),
        "Ki": WriteRule("technician", ua.VariantType.Double, tune["ki"], f"{zone}.Ki"),
        "Kd": WriteRule("technician", ua.VariantType.Double, tune["kd"], f"{zone}.Kd"),
    }
