"""Passwords from a legacy machine and the users who must set a new one: the classification of
a legacy Users.csv password cell (``records.legacy_password``; real ASP.NET Identity V2 and V3
hashes, verified once and then hashed with scrypt), the all-or-nothing ``import_users``, schema
4 -> 5, the ``tempering users`` commands, and over OPC UA (a real asyncua server and client on
loopback) a session that may only read until its user calls ChangePassword (Part 18 §5.2.8)."""

from __future__ import annotations

import base64
import hashlib
import os
import struct

import pytest
from asyncua import Server, ua
from asyncua.client import ua_session
from sqlalchemy import create_engine, text

from opcua_server import records as records_module
from opcua_server.gate import Gate, WriteRule
from opcua_server.records import (ASPNET_PREFIX, MAX_PBKDF2_ITERATIONS, ImportedUser, InvalidUser, NoSuchUser,
                                  Records, SamePassword, UserExists, WrongPassword, hash_cost, hash_password,
                                  legacy_password, new_one_time_password, verify_password)
from opcua_server.security import TemperingUser, configure_security, sees_audit

from test_opcua_security import FAST_SCRYPT, connect, fast_scrypt, users  # noqa: F401 (fixtures)

SC = ua.StatusCodes
CHANGE_PASSWORD = ua.NodeId(ua.ObjectIds.UserManagement_ChangePassword)
USER_MANAGEMENT = ua.NodeId(ua.ObjectIds.UserManagement)


def aspnet_v2(password: str, salt: bytes | None = None) -> str:
    """An ASP.NET Identity V2 hash as ``PasswordHasher`` makes it: 0x00, salt, PBKDF2-HMAC-SHA1
    subkey (1000 iterations), base64."""
    salt = salt or os.urandom(16)
    key = hashlib.pbkdf2_hmac("sha1", password.encode(), salt, 1000, 32)
    return base64.b64encode(b"\x00" + salt + key).decode()


def aspnet_v3(password: str, prf: int = 1, iterations: int = 10_000, salt: bytes | None = None,
              key_bytes: int = 32) -> str:
    """An ASP.NET Identity V3 hash: 0x01, prf, iteration count, salt length (uint32 big-endian),
    salt, PBKDF2 subkey, base64."""
    salt = salt or os.urandom(16)
    key = hashlib.pbkdf2_hmac({0: "sha1", 1: "sha256", 2: "sha512"}[prf], password.encode(), salt,
                              iterations, key_bytes)
    return base64.b64encode(b"\x01" + struct.pack(">III", prf, iterations, len(salt)) + salt + key).decode()


# --------------------------------------------------------------------------- legacy passwords

V2, V3 = aspnet_v2("Temper-2019"), aspnet_v3("Temper-2019")
V3_SHA512 = aspnet_v3("Temper-2019", prf=2, iterations=100_000)
V3_SHA1 = aspnet_v3("Temper-2019", prf=0, iterations=1_000)
#: A V3 layout asking for more iterations than a login may spend (salt and subkey zeros).
TOO_COSTLY = base64.b64encode(b"\x01" + struct.pack(">III", 1, MAX_PBKDF2_ITERATIONS + 1, 16) + bytes(48)).decode()


@pytest.mark.parametrize("cell,scheme,kept,must_change", [
    ("", "none", None, True),
    ("Temper-2019", "plain", "scrypt$", False),
    ("abc", "plain", "scrypt$", True),                          # the legacy allowed it: kept, to change
    ("x" * 1025, "plain", None, True),                          # could never be typed at a login
    (V2, "aspnet-identity-v2", ASPNET_PREFIX, False),
    (V3, "aspnet-identity-v3", ASPNET_PREFIX, False),
    (V3_SHA512, "aspnet-identity-v3", ASPNET_PREFIX, False),
    (V3_SHA1, "aspnet-identity-v3", ASPNET_PREFIX, False),
    (f" {V3}\r", "aspnet-identity-v3", ASPNET_PREFIX, False),   # white space around a hash
    (TOO_COSTLY, "aspnet-identity-v3", None, True),
    ("$2a$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW", "bcrypt", None, True),
    ("$2y$10$" + "a" * 53, "bcrypt", None, True),
    ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo", "argon2", None, True),
    ("$1$saltsalt$" + "a" * 22, "md5-crypt", None, True),
    ("$5$rounds=5000$saltsalt$" + "b" * 43, "sha256-crypt", None, True),
    ("$6$saltsalt$" + "c" * 86, "sha512-crypt", None, True),
    ("{SSHA}" + base64.b64encode(os.urandom(24)).decode(), "ldap-ssha", None, True),
    ("{SHA}" + base64.b64encode(os.urandom(20)).decode(), "ldap-sha", None, True),
    (hashlib.md5(b"pw").hexdigest(), "unknown-digest", None, True),
    (hashlib.sha256(b"pw").hexdigest().upper(), "unknown-digest", None, True),
    (base64.b64encode(hashlib.sha256(b"pw").digest()).decode(), "unknown-digest", None, True),
    # plain passwords that look a little like hashes stay plain
    ("AQAAAAEAACcQAAAAE", "plain", "scrypt$", False),           # a V3 prefix, too short
    ("$2b$12$short", "plain", "scrypt$", False),
    ("{SSHA} with spaces", "plain", "scrypt$", False),
    ("deadbeefdeadbeef", "plain", "scrypt$", False),            # 16 hex digits: no digest's length
])
def test_a_legacy_password_cell_is_classified(cell, scheme, kept, must_change):
    result = legacy_password(cell)
    assert (result.scheme, result.must_change) == (scheme, must_change), result.note
    assert result.note
    if kept is None:
        assert result.password_hash is None
    else:
        assert result.password_hash.startswith(kept)


def test_a_plain_password_is_never_kept_as_it_was():
    result = legacy_password("Temper-2019")
    assert "Temper-2019" not in result.password_hash
    assert verify_password("Temper-2019", result.password_hash)
    assert hash_cost(result.password_hash) == FAST_SCRYPT


@pytest.mark.parametrize("stored", [V2, V3, V3_SHA512, V3_SHA1])
def test_aspnet_identity_hashes_verify(stored):
    kept = legacy_password(stored).password_hash
    assert verify_password("Temper-2019", kept)
    assert not verify_password("temper-2019", kept)
    assert not verify_password("", kept)
    assert hash_cost(kept) is None                  # not scrypt: made again at the first login


def test_a_hostile_aspnet_hash_is_refused_at_once():
    hostile = ASPNET_PREFIX + base64.b64encode(b"\x01" + struct.pack(">III", 1, 2 ** 32 - 1, 16)
                                               + bytes(48)).decode()
    assert not verify_password("anything", hostile)          # no 4 billion iterations


def test_one_time_passwords_are_long_random_and_unambiguous():
    made = {new_one_time_password() for _ in range(200)}
    assert len(made) == 200
    for otp in made:
        assert len(otp) >= 16 and len(otp.replace("-", "")) == 20
        assert not set(otp) & set("0O1lIo")


# --------------------------------------------------------------------------- records

def test_an_aspnet_user_logs_in_once_with_it_then_with_scrypt(records):
    records.import_users([ImportedUser("anna", "operator", legacy_password(V3).password_hash, False)])
    assert records.check_password("anna", "wrong-password") is None
    with records.engine.connect() as db:
        assert db.execute(text("SELECT password_hash FROM users")).scalar_one().startswith(ASPNET_PREFIX)
    assert records.check_password("anna", "Temper-2019") == "operator"
    with records.engine.connect() as db:
        stored = db.execute(text("SELECT password_hash FROM users")).scalar_one()
    assert stored.startswith("scrypt$") and hash_cost(stored) == FAST_SCRYPT
    assert records.check_password("anna", "Temper-2019") == "operator"
    assert records.check_password("anna", "wrong-password") is None
    assert records.must_change("anna") is False


def test_import_users_is_all_or_nothing(records):
    records.add_user("bob", "bob-password", "admin")
    otp = new_one_time_password()
    good = ImportedUser("olga", "operator", hash_password(otp), True)
    for rows, error, field in (
            ([good, ImportedUser("bob", "viewer", hash_password("x" * 8), False)], UserExists, None),
            ([good, good._replace(role="viewer")], InvalidUser, "name"),
            ([good, ImportedUser("carl", "boss", hash_password("x" * 8), False)], InvalidUser, "role"),
            ([good, ImportedUser("carl", "viewer", "carl-password", False)], InvalidUser, "password"),
            ([good, ImportedUser("carl", "viewer", "aspnet$" + "A" * 68, False)], InvalidUser, "password"),
            ([good, ImportedUser("bad name", "viewer", hash_password("x" * 8), False)], InvalidUser, "name")):
        with pytest.raises(error) as e:
            records.import_users(rows)
        assert field is None or e.value.field == field
        assert records.list_users() == [("bob", "admin")]
    anna = ImportedUser("anna", "viewer", legacy_password(V2).password_hash, False)
    assert records.import_users([good, anna]) == 2
    assert records.list_users() == [("anna", "viewer"), ("bob", "admin"), ("olga", "operator")]
    assert records.check_password("olga", otp) == "operator"
    assert records.must_change_users() == {"olga"}
    assert records.import_users([]) == 0


def test_must_change_is_cleared_by_a_new_password(records):
    records.add_user("bob", "bob-password", "admin")
    records.import_users([ImportedUser("olga", "operator", hash_password("one-time-pw"), True)])
    assert (records.must_change("bob"), records.must_change("olga")) == (False, True)
    with pytest.raises(NoSuchUser):
        records.must_change("nobody")
    with pytest.raises(InvalidUser) as e:
        records.change_password("olga", "one-time-pw", "short")         # the rules first
    assert e.value.field == "password" and not isinstance(e.value, SamePassword)
    with pytest.raises(WrongPassword):
        records.change_password("olga", "not-the-one-time-pw", "olga-new-password")
    with pytest.raises(SamePassword):
        records.change_password("olga", "one-time-pw", "one-time-pw")
    with pytest.raises(NoSuchUser):
        records.change_password("nobody", "one-time-pw", "olga-new-password")
    assert records.must_change("olga") and records.check_password("olga", "one-time-pw") == "operator"
    records.change_password("olga", "one-time-pw", "olga-new-password")
    assert records.must_change_users() == set()
    assert records.check_password("olga", "olga-new-password") == "operator"
    assert records.check_password("olga", "one-time-pw") is None
    records.import_users([ImportedUser("carl", "viewer", hash_password("one-time-pw"), True)])
    records.set_password("carl", "carl-password")                        # an admin's passwd
    assert records.must_change_users() == set()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_schema_4_database_gets_must_change(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("postgresql_url")
    old_hash = hash_password("olga-password")
    engine = create_engine(url)
    with engine.begin() as db:
        db.execute(text("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)"))
        db.execute(text("INSERT INTO meta VALUES ('schema', '4')"))
        db.execute(text("CREATE TABLE users (name VARCHAR(64) PRIMARY KEY, role VARCHAR(16) NOT NULL, "
                        "password_hash VARCHAR(256) NOT NULL)"))
        db.execute(text("INSERT INTO users VALUES ('olga', 'operator', :h)"), {"h": old_hash})
    engine.dispose()
    r = Records(url)
    try:
        with r.engine.connect() as db:
            assert db.execute(text("SELECT value FROM meta WHERE key = 'schema'")).scalar_one() \
                == records_module.SCHEMA_VERSION
            assert db.execute(text("SELECT must_change FROM users")).scalar_one() is None
        assert r.must_change("olga") is False and r.must_change_users() == set()
        assert r.check_password("olga", "olga-password") == "operator"
        r.add_user("anna", "anna-password", "viewer")
        r.import_users([ImportedUser("carl", "viewer", hash_password("one-time-pw"), True)])
        assert r.must_change_users() == {"carl"}
    finally:
        r.close()
    Records(url).close()                                         # opened again: nothing to do


def test_users_list_shows_who_must_set_a_new_password(tmp_path, monkeypatch, capsys):
    r = Records(f"sqlite:///{tmp_path / 'opcua' / 'tempering.db'}")
    r.add_user("alice", "alice-password", "admin")
    r.import_users([ImportedUser("olga", "operator", hash_password("one-time-pw"), True)])
    assert users(tmp_path, "users", "list") == 0
    assert capsys.readouterr().out.splitlines() == [f"{'alice':<32} admin",
                                                    f"{'olga':<32} operator  (must set a new password)"]
    assert users(tmp_path, "users", "passwd", "olga", "--password-stdin", stdin="olga-password\n",
                 monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert users(tmp_path, "users", "list") == 0
    assert "must set" not in capsys.readouterr().out
    assert r.must_change("olga") is False
    r.close()


def test_an_admin_who_must_change_his_password_sees_only_his_own_audit_events():
    admin = TemperingUser(name="root", tempering_role="admin")
    pending = TemperingUser(name="root", tempering_role="admin", must_change=True)
    assert sees_audit(admin, "olga") and sees_audit(admin, None)
    assert not sees_audit(pending, "olga") and not sees_audit(pending, None)
    assert sees_audit(pending, "root")


# --------------------------------------------------------------------------- over OPC UA


@pytest.fixture
async def gated_server(opcua_pki):
    """A secured asyncua server with a gate: Setting (writable by operators) and Ping (a method
    for operators); olga (operator) must set a new password, her one-time one is
    ``opcua_pki.otp``."""
    opcua_pki.otp = new_one_time_password()
    opcua_pki.records.import_users([ImportedUser("olga", "operator", hash_password(opcua_pki.otp), True)])
    server = Server()
    await server.init()
    ns = await server.register_namespace("urn:test")
    gate = Gate(server, None, opcua_pki.records)
    setting = await server.nodes.objects.add_variable(ns, "Setting", 1.0)
    await setting.set_writable()
    gate.add_rule(setting, WriteRule("operator", ua.VariantType.Double, lambda v: None, "Setting"))
    ping = await server.nodes.objects.add_method(
        ns, "Ping", gate.method("Ping", "operator", lambda user: [ua.Variant(f"pong {user}")]),
        [], [ua.VariantType.String])
    await configure_security(server, opcua_pki.settings, opcua_pki.records, opcua_pki.pki,
                             app_uri=opcua_pki.app_uri)
    gate.install()
    async with server:
        yield setting.nodeid, ping.nodeid


def activate_results(monkeypatch) -> list[ua.StatusCode]:
    """The ServiceResult of every ActivateSession answer the client receives from now on."""
    seen: list[ua.StatusCode] = []
    decode = ua_session.struct_from_binary

    def spy(objtype, data):
        obj = decode(objtype, data)
        if objtype is ua.ActivateSessionResponse:
            seen.append(obj.ResponseHeader.ServiceResult)
        return obj
    monkeypatch.setattr(ua_session, "struct_from_binary", spy)
    return seen


async def change_password(client, old: str, new: str):
    """UserManagement.ChangePassword(OldPassword, NewPassword) of the session's user."""
    return await client.get_node(USER_MANAGEMENT).call_method(
        CHANGE_PASSWORD, ua.Variant(old, ua.VariantType.String), ua.Variant(new, ua.VariantType.String))


async def test_a_user_with_a_one_time_password_may_only_read_until_he_sets_his_own(
        gated_server, opcua_pki, monkeypatch):
    setting_id, ping_id = gated_server
    otp = opcua_pki.otp
    answers = activate_results(monkeypatch)
    client = await opcua_pki.client("olga", otp)
    await connect(client)
    try:
        assert [a.value for a in answers] == [SC.GoodPasswordChangeRequired]
        setting = client.get_node(setting_id)
        assert await setting.read_value() == 1.0                          # reads, browses
        assert await client.get_node(USER_MANAGEMENT).get_children()
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await setting.write_value(2.0)
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await client.nodes.objects.call_method(ping_id)
        with pytest.raises(ua.uaerrors.BadIdentityTokenInvalid):
            await change_password(client, "not-the-one-time-pw", "olga-own-password")
        with pytest.raises(ua.uaerrors.BadOutOfRange):
            await change_password(client, otp, "short")
        with pytest.raises(ua.uaerrors.BadAlreadyExists):
            await change_password(client, otp, otp)
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await setting.write_value(2.0)                                  # still pending
        assert opcua_pki.records.must_change("olga")

        assert await change_password(client, otp, "olga-own-password") is None
        await setting.write_value(2.0)                                      # her role's rights now
        assert await setting.read_value() == 2.0
        assert await client.nodes.objects.call_method(ping_id) == "pong olga"
    finally:
        await client.disconnect()
    assert not opcua_pki.records.must_change("olga")

    client = await opcua_pki.client("olga", "olga-own-password")
    await connect(client)
    try:
        assert answers[-1].value == SC.Good
        await client.get_node(setting_id).write_value(3.0)
    finally:
        await client.disconnect()
    client = await opcua_pki.client("olga", otp)          # within the remembered-login time too
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        await connect(client)

    rows = opcua_pki.records.audit_entries(100)[::-1]
    olga = [(r["action"], r["target"], r["result"]) for r in rows if r["user"] == "olga"]
    assert olga == [
        ("login", "session", "Good"),
        ("write", "Setting", "BadUserAccessDenied: password change required"),
        ("call", "Objects.Ping", "BadUserAccessDenied: password change required"),
        ("call", "ChangePassword", "BadIdentityTokenInvalid: wrong old password"),
        ("call", "ChangePassword", "BadOutOfRange: new password: must be 8 to 1024 characters"),
        ("call", "ChangePassword", "BadAlreadyExists: the new password must differ from the old one"),
        ("write", "Setting", "BadUserAccessDenied: password change required"),
        ("call", "ChangePassword", "Good"),
        ("write", "Setting", "Good"),
        ("call", "Ping", "Good"),
        ("login", "session", "Good"),
        ("write", "Setting", "Good"),
        ("login", "session", "BadUserAccessDenied: wrong password or unknown user"),
    ]
    logins = [r for r in rows if r["user"] == "olga" and r["action"] == "login"]
    assert "password change required" in logins[0]["new"]
    assert logins[1]["new"] == "role operator"
    for r in rows:                                        # never a password in the audit trail
        assert not {otp, "olga-own-password", "short"} & {r["old"], r["new"], r["result"]}
        assert otp not in str(r)


async def test_change_password_needs_an_encrypted_channel_and_the_right_old_one(gated_server, opcua_pki):
    client = await opcua_pki.client("olga", opcua_pki.otp, mode="Sign")
    await connect(client)
    try:
        with pytest.raises(ua.uaerrors.BadSecurityModeInsufficient):
            await change_password(client, opcua_pki.otp, "olga-own-password")
    finally:
        await client.disconnect()
    assert opcua_pki.records.must_change("olga")

    client = await opcua_pki.client("operator")           # any user may change his own
    await connect(client)
    try:
        for attempt in range(2):
            with pytest.raises(ua.uaerrors.BadIdentityTokenInvalid):
                await change_password(client, f"wrong-{attempt}-password", "operator-secret-2")
        assert await change_password(client, opcua_pki.password("operator"), "operator-secret-2") is None
    finally:
        await client.disconnect()
    assert opcua_pki.records.check_password("operator", "operator-secret-2") == "operator"
