"""Logins that cannot hurt: failed logins rate-limited and locked out (the pure limiter in virtual
time, then a real asyncua server and client over SignAndEncrypt), password checks off the event
loop, every login in the audit trail with the client's address and certificate, scrypt at OWASP's
cost with old hashes upgraded, and the server's limits answered with the standard StatusCodes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time

import pytest
from asyncua import Server, ua
from sqlalchemy import create_engine, text

from opcua_server import records as records_module
from opcua_server.limits import LoginLimiter
from opcua_server.records import Records, ScryptCost, hash_cost
from opcua_server.security import configure_security, thumbprint

from test_opcua_security import connect, fast_scrypt, real_scrypt  # noqa: F401 (fixtures)

# --------------------------------------------------------------------------- the limiter, pure

ALICE = [("user", "alice"), ("certificate", "c0ffee"), ("peer", "10.0.0.7")]
BOB = [("user", "bob"), ("certificate", "c0ffee"), ("peer", "10.0.0.7")]


def limiter(**kw) -> LoginLimiter:
    return LoginLimiter(**{"max_failures": 3, "max_failures_per_client": 5, "window_s": 60.0,
                           "lockout_s": 100.0, "delay_s": 0.5, "delay_max_s": 4.0, **kw})


def test_the_delay_doubles_with_each_failure_up_to_the_cap_then_the_user_is_locked_out():
    lim = limiter(max_failures=5)
    assert lim.delay_s(ALICE, 0.0) == 0.0 and lim.locked_until(ALICE, 0.0) == 0.0
    delays = []
    for t in range(4):
        assert lim.failed(ALICE, float(t)) == 0.0                  # not locked yet
        delays.append(lim.delay_s(ALICE, float(t)))
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert lim.failed(ALICE, 4.0) == 104.0                         # the 5th failure: locked for 100 s
    assert lim.delay_s(ALICE, 4.0) == 4.0                          # capped
    assert lim.locked_until([("user", "alice")], 103.9) == 104.0
    assert lim.locked_until([("user", "alice")], 104.0) == 0.0     # served: a clean slate
    assert lim.delay_s([("user", "alice")], 104.0) == 0.0


def test_a_success_forgets_the_users_failures_not_the_certificates():
    lim = limiter()
    lim.failed(ALICE, 0.0)
    lim.failed(ALICE, 1.0)
    lim.succeeded(("user", "alice"), 2.0)
    assert lim.failures([("user", "alice")], 2.0) == 0
    assert lim.failures([("certificate", "c0ffee")], 2.0) == 2     # a valid account does not wash guesses
    assert lim.delay_s(ALICE, 2.0) == 1.0                          # the certificate's two failures


def test_failures_older_than_the_window_are_forgotten():
    lim = limiter()
    lim.failed(ALICE, 0.0)
    lim.failed(ALICE, 30.0)
    assert lim.failures(ALICE, 59.9) == 2
    assert lim.failures(ALICE, 60.0) == 1
    assert lim.failed(ALICE, 61.0) == 0.0                          # 2 within the window: not locked
    assert lim.failures(ALICE, 90.0) == 1


def test_a_certificate_or_a_host_is_locked_after_its_own_limit_across_user_names():
    lim = limiter()
    names = [[("user", f"guess{i}"), ("certificate", "c0ffee"), ("peer", "10.0.0.7")] for i in range(5)]
    for i, keys in enumerate(names[:4]):
        assert lim.failed(keys, float(i)) == 0.0                   # each name failed once only
    assert lim.failed(names[4], 4.0) == 104.0                      # the certificate's 5th failure
    assert lim.locked_until(BOB, 5.0) == 104.0                     # so bob, from there, is refused
    assert lim.locked_until([("user", "bob"), ("certificate", "other"), ("peer", "10.0.0.8")], 5.0) == 0.0
    lim.succeeded(("user", "bob"), 6.0)
    assert lim.locked_until(BOB, 6.0) == 104.0


def test_a_locked_user_stays_locked_through_a_success_and_more_failures():
    lim = limiter()
    for t in range(3):
        lim.failed(ALICE, float(t))
    assert lim.locked_until(ALICE, 3.0) == 102.0
    lim.succeeded(("user", "alice"), 3.0)
    assert lim.failed(ALICE, 50.0) == 102.0                        # a lock-out is not extended
    assert lim.locked_until([("user", "alice")], 102.0) == 0.0


def test_the_limiter_forgets_the_oldest_keys_beyond_its_bound():
    lim = limiter(max_keys=100)
    for i in range(1000):
        lim.failed([("user", f"made-up-{i}")], float(i) / 1000)
    assert len(lim._records) == 100
    assert lim.failures([("user", "made-up-999")], 1.0) == 1
    assert lim.failures([("user", "made-up-0")], 1.0) == 0


def test_the_user_manager_refuses_a_locked_user_without_a_password_check(tmp_path):
    """The same rules without an event loop (get_user called directly): virtual time, no delay."""
    from opcua_server.security import TemperingUserManager

    r = Records(f"sqlite:///{tmp_path / 'r.db'}")
    r.add_user("alice", "alice-password", "operator")
    checks, now = [], [0.0]
    check = r.check_password
    r.check_password = lambda n, p: checks.append(n) or check(n, p)
    um = TemperingUserManager(r, allow_unsecured=True, limiter=limiter(lockout_s=30.0), clock=lambda: now[0])
    for _ in range(3):
        assert um.check("alice", "wrong-password", peer=("10.0.0.7", 50000)).user is None
    attempt = um.check("alice", "alice-password", peer=("10.0.0.7", 50001))
    assert attempt.user is None and attempt.reason == "locked out (30 s left)"
    assert um.get_user(None, "alice", "alice-password") is None
    assert checks == ["alice"] * 3                                  # no scrypt while locked
    now[0] = 30.0
    assert um.get_user(None, "alice", "alice-password").tempering_role == "operator"
    r.close()


# --------------------------------------------------------------------------- scrypt's cost


def test_an_old_hash_is_upgraded_to_owasps_cost_at_the_next_successful_login(tmp_path, monkeypatch, real_scrypt):
    assert real_scrypt == ScryptCost(2 ** 17, 8, 1)
    r = Records(f"sqlite:///{tmp_path / 'r.db'}")
    monkeypatch.setattr(records_module, "SCRYPT_COST", ScryptCost(2 ** 14, 8, 1))    # as before
    r.add_user("alice", "alice-password", "operator")
    monkeypatch.setattr(records_module, "SCRYPT_COST", real_scrypt)

    def stored() -> str:
        with r.engine.connect() as db:
            return db.execute(text("SELECT password_hash FROM users WHERE name = 'alice'")).scalar_one()

    old = stored()
    assert hash_cost(old) == (2 ** 14, 8, 1)
    assert r.check_password("alice", "wrong-password") is None
    assert stored() == old                                          # a wrong one changes nothing
    assert r.check_password("alice", "alice-password") == "operator"
    new = stored()
    scheme, n, rr, p, _salt, _key = new.split("$")
    assert (scheme, int(n), int(rr), int(p)) == ("scrypt", 2 ** 17, 8, 1)
    assert r.check_password("alice", "alice-password") == "operator"
    assert stored() == new                                          # upgraded once
    r.set_password("alice", "other-password")
    assert hash_cost(stored()) == (2 ** 17, 8, 1)                   # a changed password: the new cost
    r.close()


def test_an_unknown_user_costs_a_current_hash(tmp_path, monkeypatch, real_scrypt):
    r = Records(f"sqlite:///{tmp_path / 'r.db'}")
    costs = []
    real = records_module.hashlib.scrypt
    monkeypatch.setattr(records_module.hashlib, "scrypt",
                        lambda *a, **kw: costs.append((kw["n"], kw["r"], kw["p"])) or real(*a, **kw))
    assert r.check_password("nobody", "some-password") is None
    assert costs[-1] == (2 ** 17, 8, 1)
    r.close()


def test_a_schema_1_database_gets_the_new_audit_columns(tmp_path):
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as db:
        db.execute(text("CREATE TABLE audit (id INTEGER PRIMARY KEY, time TEXT NOT NULL, user_name TEXT "
                        "NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, old_value TEXT, new_value "
                        "TEXT, result TEXT NOT NULL)"))
        db.execute(text("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)"))
        db.execute(text("INSERT INTO meta VALUES ('schema', '1')"))
        db.execute(text("INSERT INTO audit (time, user_name, action, target, result) VALUES "
                        "('2026-01-01T00:00:00.000Z', 'olga', 'call', 'Hold', 'Good')"))
    engine.dispose()
    r = Records(f"sqlite:///{path}")
    r.audit("olga", "call", "Resume", None, None, "Good", 0.0, command_id="c-1", origin="opcua")
    new, old = r.audit_entries()
    assert (old["target"], old["command_id"], old["origin"], old["peer"]) == ("Hold", None, None, None)
    assert (new["target"], new["command_id"], new["origin"]) == ("Resume", "c-1", "opcua")
    with r.engine.connect() as db:
        assert db.execute(text("SELECT value FROM meta WHERE key = 'schema'")).scalar_one() == records_module.SCHEMA_VERSION
    r.close()


# --------------------------------------------------------------------------- a real server


@contextlib.asynccontextmanager
async def serving(opcua_pki, **settings):
    """A secured asyncua Server (empty address space) on ``opcua_pki`` with these settings."""
    cfg = opcua_pki.settings.model_copy(update=settings)
    server = Server()
    await server.init()
    manager = await configure_security(server, cfg, opcua_pki.records, opcua_pki.pki, app_uri=opcua_pki.app_uri)
    async with server:
        yield server, manager


async def login(opcua_pki, user, password=None, **kw) -> float:
    """Connect and disconnect; the seconds it took (raises what connecting raised)."""
    client = await opcua_pki.client(user, password, **kw)
    started = time.perf_counter()
    await connect(client)
    elapsed = time.perf_counter() - started
    await client.disconnect()
    return elapsed


async def refused(opcua_pki, user, password=None, error=ua.uaerrors.BadUserAccessDenied, **kw) -> float:
    client = await opcua_pki.client(user, password, **kw)
    started = time.perf_counter()
    with pytest.raises(error):
        await connect(client)
    return time.perf_counter() - started


def logins(opcua_pki) -> list[dict]:
    return [e for e in opcua_pki.records.audit_entries(1000) if e["action"] == "login"][::-1]


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_wrong_password_is_slowed_then_locked_out_and_the_right_one_waits_for_the_end(opcua_pki):
    checks = []
    check = opcua_pki.records.check_password
    opcua_pki.records.check_password = lambda n, p: checks.append(n) or check(n, p)
    async with serving(opcua_pki, login_max_failures=3, login_delay_s=0.4, login_delay_max_s=0.8,
                       login_lockout_s=3.0):
        first = await refused(opcua_pki, "operator", "wrong-password-1")
        second = await refused(opcua_pki, "operator", "wrong-password-2")
        third = await refused(opcua_pki, "operator", "wrong-password-3")      # the 3rd: locked
        assert second >= 0.4 > first and third >= 0.8
        assert checks == ["operator"] * 3
        locked_at = time.monotonic()
        assert await refused(opcua_pki, "operator") < 0.4                 # the right password, locked
        assert checks == ["operator"] * 3                                  # ... and no scrypt for it
        # another user through the same certificate: slowed by its failures, not locked (20)
        assert await login(opcua_pki, "viewer") >= 0.8
        await asyncio.sleep(max(0.0, locked_at + 3.1 - time.monotonic()))
        await login(opcua_pki, "operator")                                  # the lock-out has ended
        assert checks[-1] == "operator"
        await until(lambda: len(logins(opcua_pki)) == 6)
    results = [(e["user"], re.sub(r"\d+ s", "N s", e["result"])) for e in logins(opcua_pki)]
    assert results == [
        ("operator", "BadUserAccessDenied: wrong password or unknown user"),
        ("operator", "BadUserAccessDenied: wrong password or unknown user"),
        ("operator", "BadUserAccessDenied: wrong password or unknown user; now locked out (N s)"),
        ("operator", "BadUserAccessDenied: locked out (N s left)"),
        ("viewer", "Good"),
        ("operator", "Good"),
    ]


async def test_every_login_is_audited_with_peer_address_and_certificate(opcua_pki):
    trusted, untrusted = (thumbprint(p.read_bytes()) for p in (opcua_pki.client_cert, opcua_pki.untrusted_cert))
    async with serving(opcua_pki):
        await login(opcua_pki, "technician")
        await refused(opcua_pki, "technician", "not-the-password")
        await refused(opcua_pki, "nobody", "not-the-password")
        await refused(opcua_pki, None, error=ua.uaerrors.BadIdentityTokenRejected)
        await refused(opcua_pki, "admin", trusted=False, error=ua.uaerrors.BadCertificateUntrusted)
        await until(lambda: len(logins(opcua_pki)) == 5)
    rows = logins(opcua_pki)
    assert [(e["user"], e["result"], e["certificate"], e["new"]) for e in rows] == [
        ("technician", "Good", trusted, "role technician"),
        ("technician", "BadUserAccessDenied: wrong password or unknown user", trusted, None),
        ("nobody", "BadUserAccessDenied: wrong password or unknown user", trusted, None),
        ("anonymous", "BadIdentityTokenRejected: anonymous not allowed", trusted, None),
        ("-", "BadCertificateUntrusted", untrusted, None),
    ]
    for e in rows:
        host, port = e["peer"].rsplit(":", 1)
        assert host == "127.0.0.1" and 1024 <= int(port) < 65536 and port != str(opcua_pki.settings.port)
        assert e["target"] == "session" and e["origin"] == "opcua" and e["time"].endswith("Z")
    assert len({e["peer"] for e in rows}) == 5                          # a connection each


async def test_password_checks_do_not_block_the_event_loop(opcua_pki, real_scrypt, monkeypatch):
    scrypt_s = time.perf_counter()
    records_module.hash_password("a password to time scrypt with")
    scrypt_s = time.perf_counter() - scrypt_s
    loop_thread = threading.current_thread()
    checks = []
    verify = records_module.verify_password

    def recorded(*args, **kw):
        checks.append(threading.current_thread())
        return verify(*args, **kw)
    monkeypatch.setattr(records_module, "verify_password", recorded)
    async with serving(opcua_pki):
        gaps = []
        stop = asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        await asyncio.gather(*(refused(opcua_pki, role, "wrong-password") for role in opcua_pki.ROLES))
        took = time.perf_counter() - started
        stop.set()
        await task
    assert took >= 4 * scrypt_s * 0.8               # four checks, one at a time: they did run
    assert checks and not any(t is loop_thread for t in checks)       # none on the event loop
    # the loop kept ticking meanwhile (asyncua's own crypto of the clients and the server, in
    # this one process, makes gaps too; four scrypt checks on the loop would make 4 x scrypt_s)
    assert max(gaps) < 2 * scrypt_s, (max(gaps), scrypt_s)


# --------------------------------------------------------------------------- server limits


def monitored(nodeid: ua.NodeId, handle: int, sampling_ms: float) -> ua.MonitoredItemCreateRequest:
    return ua.MonitoredItemCreateRequest(
        ItemToMonitor=ua.ReadValueId(NodeId=nodeid, AttributeId=ua.AttributeIds.Value),
        MonitoringMode=ua.MonitoringMode.Reporting,
        RequestedParameters=ua.MonitoringParameters(ClientHandle=handle, SamplingInterval=sampling_ms,
                                                    QueueSize=1, DiscardOldest=True))


async def test_too_many_sessions_are_refused(opcua_pki):
    async with serving(opcua_pki, max_sessions=2):
        first, second = await opcua_pki.client("viewer"), await opcua_pki.client("operator")
        await connect(first)
        await connect(second)
        try:
            await refused(opcua_pki, "admin", error=ua.uaerrors.BadTooManySessions)
        finally:
            await second.disconnect()
        await login(opcua_pki, "admin")                 # a session closed: room again
        await first.disconnect()


async def test_a_refused_certificate_holds_no_session(opcua_pki):
    """asyncua makes the session before it checks the certificate; a client refused there that
    keeps its connection open must not keep a session (it would fill max_sessions)."""
    async with serving(opcua_pki, max_sessions=1):
        stranger = await opcua_pki.client("admin", trusted=False)
        await stranger.connect_socket()
        try:
            await stranger.send_hello()
            await stranger.open_secure_channel()
            with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
                await stranger.create_session()
            await login(opcua_pki, "operator")          # the one session there is room for
        finally:
            stranger.disconnect_socket()


async def test_subscriptions_monitored_items_and_intervals_are_limited(opcua_pki):
    async with serving(opcua_pki, max_subscriptions_per_session=2, max_monitored_items_per_session=3,
                       min_publishing_interval_ms=100.0, min_sampling_interval_ms=250.0):
        client = await opcua_pki.client("viewer")
        await connect(client)
        try:
            params = ua.CreateSubscriptionParameters(RequestedPublishingInterval=10.0, RequestedLifetimeCount=1000,
                                                     RequestedMaxKeepAliveCount=10, PublishingEnabled=True)
            subs = [await client.uaclient.create_subscription(params, lambda result: None) for _ in range(2)]
            assert [s.RevisedPublishingInterval for s in subs] == [100.0, 100.0]
            with pytest.raises(ua.uaerrors.BadTooManySubscriptions):
                await client.uaclient.create_subscription(params, lambda result: None)

            nodes = [ua.NodeId(i) for i in (ua.ObjectIds.Server_ServerStatus_CurrentTime,
                                             ua.ObjectIds.Server_ServerStatus_State,
                                             ua.ObjectIds.Server_ServiceLevel,
                                             ua.ObjectIds.Server_ServerStatus_StartTime)]
            results = await client.uaclient.create_monitored_items(ua.CreateMonitoredItemsParameters(
                SubscriptionId=subs[0].SubscriptionId, TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[monitored(n, i, 10.0) for i, n in enumerate(nodes)]))
            assert [r.StatusCode.name for r in results] == ["Good", "Good", "Good", "BadTooManyMonitoredItems"]
            assert [r.RevisedSamplingInterval for r in results[:3]] == [250.0] * 3
            more = await client.uaclient.create_monitored_items(ua.CreateMonitoredItemsParameters(
                SubscriptionId=subs[1].SubscriptionId, TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[monitored(nodes[3], 9, 1000.0)]))
            assert [r.StatusCode.name for r in more] == ["BadTooManyMonitoredItems"]   # per session
        finally:
            await client.disconnect()
