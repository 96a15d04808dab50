"""Audit events (OPC UA Part 5 §6.4) where a generic client looks for them: on the Server object
(ns=0;i=2253). A write or a method call is an AuditWriteUpdateEventType /
AuditUpdateMethodEventType on the Server object and on the machine object with one EventId; every
ActivateSession is an AuditActivateSessionEventType (Status True or False, who, from where, why
refused, never the password); a session refused for its certificate is an
AuditCreateSessionEventType. Admins see every audit event, other users those of their own
actions only."""

from __future__ import annotations

import asyncio
import time

import pytest
from asyncua import ua

from machines import InProcessMachine
from test_opcua_security import connect, fast_scrypt  # noqa: F401 (fixture)

SERVER = ua.NodeId(ua.ObjectIds.Server)
METHOD = ua.ObjectIds.AuditUpdateMethodEventType
WRITE = ua.ObjectIds.AuditWriteUpdateEventType
ACTIVATE = ua.ObjectIds.AuditActivateSessionEventType
CREATE = ua.ObjectIds.AuditCreateSessionEventType


async def until(predicate, timeout_s=5.0):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("not within the time")
        await asyncio.sleep(0.05)


class Events:
    def __init__(self):
        self.got = []

    def event_notification(self, event):
        self.got.append(event)

    def of(self, etype) -> list:
        return [e for e in self.got if e.EventType == ua.NodeId(etype)]


async def watch(client, node_id, *etypes) -> Events:
    events = Events()
    sub = await client.create_subscription(50, events)
    await sub.subscribe_events(client.get_node(node_id), [client.get_node(ua.NodeId(t)) for t in etypes])
    return events


def fields_text(event) -> str:
    """Every field of a received event as text, byte strings decoded as far as they go."""
    out = []
    for name, value in vars(event).items():
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("latin-1")
        out.append(f"{name}={value!r}")
    return "\n".join(out)


async def test_writes_and_calls_are_audit_events_on_the_server_object_for_admins_and_the_actor(opcua_pki):
    async with InProcessMachine(opcua_pki) as m:
        machine = m.nodes.machine.nodeid
        async with await opcua_pki.client("admin") as admin, \
                await opcua_pki.client("operator") as op, \
                await opcua_pki.client("technician") as tech, \
                await opcua_pki.client("viewer") as viewer:
            assert ua.EventNotifier.SubscribeToEvents in await admin.get_node(SERVER).read_event_notifier()
            on_server = await watch(admin, SERVER, METHOD, WRITE)
            on_machine = await watch(admin, machine, METHOD, WRITE)
            operators = await watch(op, SERVER, METHOD, WRITE)
            viewers = await watch(viewer, SERVER, METHOD, WRITE, ACTIVATE)
            parent = op.get_node(await m.server.server.get_node(m.nodes.methods["Hold"].nodeid).get_parent())
            with pytest.raises(ua.UaStatusCodeError):             # nothing to hold: the scan refuses
                await parent.call_method(op.get_node(m.nodes.methods["Hold"]))
            trim = tech.get_node(m.nodes.zones["pump"]["Trim"])
            await trim.write_value(ua.DataValue(ua.Variant(1.0, ua.VariantType.Double)))

            await until(lambda: on_server.of(METHOD) and on_server.of(WRITE))
            call = on_server.of(METHOD)[0]
            assert call.Status is False and call.ClientUserId == "operator"
            assert call.SourceNode == machine and call.ServerId == opcua_pki.app_uri
            assert call.Message.Text.startswith("Hold by operator: BadInvalidState: ")
            assert call.MethodId == m.nodes.methods["Hold"].nodeid
            assert call.StatusCodeId.value == ua.StatusCodes.BadInvalidState
            write = on_server.of(WRITE)[0]
            assert write.Status is True and write.ClientUserId == "technician"
            assert write.Message.Text == "pump.Trim by technician: accepted"
            assert write.ClientAuditEntryId            # the command's id, as in the audit trail
            # the same events on the machine object, with the same EventIds
            await until(lambda: len(on_machine.got) >= 2)
            assert {e.EventId for e in on_machine.got} == {e.EventId for e in on_server.got}
            # the operator sees his own call, not the technician's write; the viewer nothing
            await until(lambda: operators.of(METHOD))
            await asyncio.sleep(0.3)
            assert [e.ClientUserId for e in operators.got] == ["operator"]
            assert viewers.got == []


async def test_a_refused_login_is_an_audit_event_without_the_password(secured_server, opcua_pki):
    async with await opcua_pki.client("admin") as admin:
        logins = await watch(admin, SERVER, ACTIVATE)
        wrong = "not-the-password-42"
        for user in ("operator", "nobody"):
            client = await opcua_pki.client(user, wrong)
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await connect(client)
        await until(lambda: len(logins.of(ACTIVATE)) == 2)
        for event, user in zip(logins.of(ACTIVATE), ("operator", "nobody")):
            assert event.Status is False and event.ClientUserId == user
            assert event.StatusCodeId.value == ua.StatusCodes.BadUserAccessDenied
            assert event.SourceNode == SERVER and event.ServerId == opcua_pki.app_uri
            assert event.SessionId is not None and not event.SessionId.is_null()
            assert event.SecureChannelId
            assert event.UserIdentityToken.UserName == user and not event.UserIdentityToken.Password
            text = event.Message.Text
            assert f"session of {user} from 127.0.0.1:" in text
            assert "refused: BadUserAccessDenied: wrong password or unknown user" in text
            assert wrong not in fields_text(event) and wrong.encode() not in repr(vars(event)).encode()
            assert opcua_pki.password(user if user != "nobody" else "operator") not in fields_text(event)


async def test_a_login_is_an_audit_event_with_status_true_seen_by_admins_only(secured_server, opcua_pki):
    async with await opcua_pki.client("admin") as admin, await opcua_pki.client("operator") as op:
        logins = await watch(admin, SERVER, ACTIVATE)
        others = await watch(op, SERVER, ACTIVATE)
        async with await opcua_pki.client("technician"):
            await until(lambda: logins.of(ACTIVATE))
        event = logins.of(ACTIVATE)[0]
        assert event.Status is True and event.ClientUserId == "technician"
        assert event.StatusCodeId.value == ua.StatusCodes.Good
        assert event.Message.Text.startswith("session of technician from 127.0.0.1:")
        assert event.Message.Text.endswith("activated (role technician)")
        assert not event.UserIdentityToken.Password
        assert opcua_pki.password("technician") not in fields_text(event)
        await asyncio.sleep(0.3)
        assert others.got == []                       # an operator does not see others' logins


async def test_a_session_refused_for_its_certificate_is_an_audit_event(secured_server, opcua_pki):
    async with await opcua_pki.client("admin") as admin:
        sessions = await watch(admin, SERVER, CREATE)
        stranger = await opcua_pki.client("operator", trusted=False)
        with pytest.raises(ua.UaStatusCodeError):
            await connect(stranger)
        await until(lambda: sessions.of(CREATE))
        event = sessions.of(CREATE)[0]
        assert event.Status is False
        assert event.StatusCodeId.value == ua.StatusCodes.BadCertificateUntrusted
        assert "refused: BadCertificateUntrusted" in event.Message.Text
        assert event.ClientCertificateThumbprint and event.ClientApplicationUri == opcua_pki.client_uri


async def test_one_session_per_secure_channel_and_requests_only_with_its_token(opcua_pki):
    """asyncua keeps one session per secure channel: a second CreateSession on a live channel
    is refused (it would replace the first, whose requests would then run as the second's
    user), and a request carrying another session's token is refused."""
    from asyncua import ua

    from machines import InProcessMachine

    async with InProcessMachine(opcua_pki) as m:
        async with await opcua_pki.client("viewer") as viewer:
            phase = viewer.get_node(m.nodes.sequencer["Phase"].nodeid)
            await phase.read_value()
            try:
                await viewer.create_session()
            except ua.UaStatusCodeError as e:
                refused = type(e).__name__
            else:
                refused = "Good"
            assert refused == "BadTooManySessions"
            await phase.read_value()                          # the first session goes on
            protocol = viewer.uaclient.protocol
            token, protocol.authentication_token = protocol.authentication_token, ua.NodeId(424242)
            try:
                await phase.read_value()
            except ua.UaStatusCodeError as e:
                refused = type(e).__name__
            finally:
                protocol.authentication_token = token
            assert refused == "BadSessionIdInvalid"
