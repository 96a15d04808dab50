"""Security by default of the OPC UA server: records (users, recipes, audit) on SQLite and on a
real PostgreSQL, password hashing, roles, the PKI, the ``tempering users`` / ``pki`` commands,
and a real asyncua server and client on loopback: who gets a session and who does not."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from asyncua import Client, Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import text, update

from opcua_server import records as records_module
from tempering.cli import main
from opcua_server.config import DEFAULT_CONFIG, OpcUaSettings
from opcua_server.records import (ROLES, InvalidRecipe, InvalidUser, LastAdmin, NoSuchRecipe, NoSuchUser,
                                  Records, UserExists)
from opcua_server.security import (AmbiguousCertificate, BadCertificateFile, NoSuchCertificate, Pki, PkiError,
                                   TemperingRuleset, TemperingUser, TemperingUserManager, configure_security,
                                   current_user, role_allows, thumbprint)
from plc.config import ConfigError, load_all

from conftest import MACHINE_FILE, OpcUaTestPki

ROOT = Path(__file__).resolve().parent.parent


FAST_SCRYPT = records_module.ScryptCost(2 ** 12, 8, 1)


@pytest.fixture(autouse=True)
def fast_scrypt(request, monkeypatch):
    """Passwords hashed at a low cost (records.SCRYPT_COST) unless the test asks for
    ``real_scrypt``: the real one is 0.5 s per hash, and each secured server has four users."""
    if "real_scrypt" not in request.fixturenames:
        monkeypatch.setattr(records_module, "SCRYPT_COST", FAST_SCRYPT)


@pytest.fixture
def real_scrypt():
    """The production cost (records.SCRYPT_COST as shipped: N=2^17, r=8, p=1)."""
    return records_module.SCRYPT_COST


@pytest.fixture(scope="module")
def book():
    return load_all(MACHINE_FILE)[1]


# --------------------------------------------------------------------------- records: users


def test_users_add_list_role_password_delete(records):
    records.add_user("alice", "alice-password", "admin")
    records.add_user("bob", "bob-password", "operator")
    assert records.list_users() == [("alice", "admin"), ("bob", "operator")]
    assert records.check_password("bob", "bob-password") == "operator"
    records.set_role("bob", "technician")
    assert records.role_of("bob") == "technician"
    assert records.check_password("bob", "bob-password") == "technician"
    records.set_password("bob", "new-bob-password")
    assert records.check_password("bob", "bob-password") is None
    assert records.check_password("bob", "new-bob-password") == "technician"
    records.delete_user("bob")
    assert records.list_users() == [("alice", "admin")]
    assert records.check_password("bob", "new-bob-password") is None


def test_user_mistakes_are_refused_and_change_nothing(records):
    records.add_user("alice", "alice-password", "admin")
    with pytest.raises(UserExists):
        records.add_user("alice", "other-password", "viewer")
    with pytest.raises(InvalidUser) as e:
        records.add_user("eve", "short", "viewer")
    assert e.value.field == "password"
    with pytest.raises(InvalidUser) as e:
        records.add_user("eve", "long-enough-pw", "root")
    assert e.value.field == "role" and "viewer, operator, technician, admin" in str(e.value)
    with pytest.raises(InvalidUser) as e:
        records.add_user("eve smith", "long-enough-pw", "viewer")
    assert e.value.field == "name"
    with pytest.raises(NoSuchUser):
        records.set_password("nobody", "long-enough-pw")
    with pytest.raises(NoSuchUser):
        records.set_role("nobody", "viewer")
    with pytest.raises(NoSuchUser):
        records.delete_user("nobody")
    with pytest.raises(InvalidUser):
        records.set_role("alice", "superuser")
    assert records.list_users() == [("alice", "admin")]
    assert records.check_password("alice", "alice-password") == "admin"


def test_the_last_admin_cannot_be_deleted_or_demoted(records):
    records.add_user("alice", "alice-password", "admin")
    with pytest.raises(LastAdmin):
        records.delete_user("alice")
    with pytest.raises(LastAdmin):
        records.set_role("alice", "operator")
    records.add_user("carol", "carol-password", "admin")
    records.set_role("alice", "operator")
    with pytest.raises(LastAdmin):
        records.delete_user("carol")
    assert records.list_users() == [("alice", "operator"), ("carol", "admin")]


def test_wrong_password_unknown_user_and_junk_are_refused(records):
    records.add_user("alice", "alice-password", "admin")
    assert records.check_password("alice", "alice-password") == "admin"
    for name, password in [("alice", "alice-passworD"), ("alice", ""), ("alice", "alice-password "),
                           ("Alice", "alice-password"), ("mallory", "alice-password"),
                           ("alice", None), (None, "alice-password"), ("alice", "x" * 5000)]:
        assert records.check_password(name, password) is None, (name, password)


def test_passwords_are_stored_only_as_salted_scrypt_hashes(records, real_scrypt):
    records.add_user("alice", "same-password-1", "admin")
    records.add_user("bob", "same-password-1", "viewer")
    with records.engine.connect() as db:
        rows = dict(db.execute(text("SELECT name, password_hash FROM users")).all())
    assert set(rows) == {"alice", "bob"}
    for stored in rows.values():
        assert "same-password-1" not in stored
        scheme, n, r, p, salt, key = stored.split("$")
        assert (scheme, int(n), int(r), int(p)) == ("scrypt", 2 ** 17, 8, 1)   # OWASP's minimum
        assert len(records_module.base64.b64decode(salt)) == 16
    assert rows["alice"] != rows["bob"]                    # a salt per user


def test_the_sqlite_file_holds_no_password(tmp_path):
    path = tmp_path / "tempering.db"
    r = Records(f"sqlite:///{path}")
    r.add_user("alice", "PlainTextNeverStored-1", "admin")
    r.set_password("alice", "PlainTextNeverStored-2")
    r.close()
    raw = path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("tempering.db-*"))
    assert b"PlainTextNeverStored" not in raw
    assert b"PlainTextNeverStored".hex().encode() not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_password_check_compares_in_constant_time(monkeypatch, tmp_path):
    calls = []
    real = records_module.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(records_module.hmac, "compare_digest", spy)
    r = Records(f"sqlite:///{tmp_path / 'db.sqlite'}")
    r.add_user("alice", "alice-password", "admin")
    assert r.check_password("alice", "alice-password") == "admin"
    assert r.check_password("alice", "wrong-password") is None
    assert calls == [(32, 32), (32, 32)]
    # an unknown user costs the same scrypt work as a known one
    derivations = []
    records_module._dummy_hash()             # made once, on the first unknown user
    real_scrypt = hashlib.scrypt
    monkeypatch.setattr(records_module.hashlib, "scrypt",
                        lambda *a, **kw: derivations.append(kw["n"]) or real_scrypt(*a, **kw))
    assert r.check_password("nobody", "alice-password") is None
    assert r.check_password("alice", "wrong-password") is None
    assert derivations == [FAST_SCRYPT.n, FAST_SCRYPT.n]
    r.close()


def test_records_can_be_used_from_threads(tmp_path):
    r = Records(f"sqlite:///{tmp_path / 'db.sqlite'}")
    r.add_user("alice", "alice-password", "admin")

    async def main_():
        return await asyncio.gather(*[asyncio.to_thread(r.check_password, "alice", "alice-password")
                                      for _ in range(4)])
    assert asyncio.run(main_()) == ["admin"] * 4
    r.close()


# --------------------------------------------------------------------------- records: recipes


def test_recipes_are_seeded_once_then_the_database_is_the_source(records, book):
    assert records.load_recipes() == {}
    assert records.seed_recipes(book) == 3
    loaded = records.load_recipes()
    assert loaded == {rid: r.model_dump() for rid, r in book.recipes.items()}
    for rid in list(loaded):
        records.delete_recipe(rid)
    assert records.seed_recipes(book) == 0          # not again, even with no recipe left
    assert records.load_recipes() == {}


def test_recipes_are_validated_before_writing(records, book):
    dark = book["dark-70"].model_dump()
    saved = records.save_recipe("dark-72", {**dark, "name": "Dark 72 %", "pouring_goal": 31})
    assert saved["pouring_goal"] == 31.0 and saved["name"] == "Dark 72 %"
    assert records.load_recipes()["dark-72"] == saved
    records.save_recipe("dark-72", {**dark, "pouring_goal": 32})
    assert records.load_recipes()["dark-72"]["pouring_goal"] == 32
    with pytest.raises(InvalidRecipe) as e:
        records.save_recipe("dark-72", {**dark, "heating_goal": 80})
    assert e.value.messages == ["recipes.dark-72.heating_goal: must be <= 60 (got 80)"]
    with pytest.raises(InvalidRecipe) as e:
        records.save_recipe("dark-72", {**dark, "cooling_goal": 33, "pouring_goal": 32})
    assert "cooling_goal must be <= pouring_goal" in str(e.value)
    with pytest.raises(InvalidRecipe) as e:
        records.save_recipe("Dark 72", dark)
    assert "lower-case letters" in str(e.value)
    with pytest.raises(InvalidRecipe):
        records.save_recipe("dark-73", {**dark, "colour": "brown"})
    with pytest.raises(InvalidRecipe):
        records.save_recipe("dark-73", {**dark, "pedal": "sometimes"})
    assert records.load_recipes()["dark-72"]["pouring_goal"] == 32
    assert set(records.load_recipes()) == {"dark-72"}
    with pytest.raises(NoSuchRecipe):
        records.delete_recipe("dark-73")


def test_recipes_are_validated_again_when_read(records, book):
    records.save_recipe("dark-70", book["dark-70"].model_dump())
    with records.engine.begin() as db:      # changed behind the server's back
        db.execute(update(records_module.recipes).values(cooling_goal=55.0))
    with pytest.raises(InvalidRecipe) as e:
        records.load_recipes()
    assert e.value.recipe_id == "dark-70"
    assert "recipes.dark-70.cooling_goal: must be <= 40 (got 55.0)" in e.value.messages


# --------------------------------------------------------------------------- records: audit


def test_audit_rows_are_text_newest_first(records):
    t0 = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.timezone.utc).timestamp()
    records.audit("olga", "write", "ns=2;s=Zones/Pump/Trim", 0.0, 0.5, "Good", t0)
    records.audit("olga", "call", "Sequencer.StartRecipe", None, "['dark-70']", "Good", t0 + 1.25)
    records.audit("victor", "write", "ns=2;s=Zones/Pump/Trim", 0.5, 3, "BadUserAccessDenied", t0 + 2)
    records.audit("olga", "call", "Sequencer.Hold", None, "[]", "Good", t0 + 3, command_id="c-17",
                  origin="opcua")
    entries = records.audit_entries(limit=10)
    none = {"command_id": None, "origin": None, "peer": None, "certificate": None, "machine": None}
    assert entries == [
        {"time": "2026-03-01T12:00:03.000Z", "user": "olga", "action": "call",
         "target": "Sequencer.Hold", "old": None, "new": "[]", "result": "Good",
         **none, "command_id": "c-17", "origin": "opcua"},
        {"time": "2026-03-01T12:00:02.000Z", "user": "victor", "action": "write",
         "target": "ns=2;s=Zones/Pump/Trim", "old": "0.5", "new": "3", "result": "BadUserAccessDenied", **none},
        {"time": "2026-03-01T12:00:01.250Z", "user": "olga", "action": "call",
         "target": "Sequencer.StartRecipe", "old": None, "new": "['dark-70']", "result": "Good", **none},
        {"time": "2026-03-01T12:00:00.000Z", "user": "olga", "action": "write",
         "target": "ns=2;s=Zones/Pump/Trim", "old": "0.0", "new": "0.5", "result": "Good", **none},
    ]
    assert records.audit_entries(limit=1) == entries[:1]
    columns = {c.name: str(c.type) for c in records_module.audit_log.columns}
    assert columns == {"id": "INTEGER", **{c: "TEXT" for c in (
        "time", "user_name", "action", "target", "old_value", "new_value", "result",
        "command_id", "origin", "peer", "certificate", "machine")}}


def test_records_url_hides_the_database_password(postgresql_url):
    r = Records(postgresql_url)
    password = postgresql_url.split(":")[2].split("@")[0]
    assert password not in repr(r) and "***" in repr(r)
    r.close()


# --------------------------------------------------------------------------- roles


@pytest.mark.parametrize("role,needed,allowed", [
    ("viewer", "viewer", True), ("viewer", "operator", False),
    ("operator", "viewer", True), ("operator", "operator", True), ("operator", "technician", False),
    ("technician", "operator", True), ("technician", "admin", False),
    ("admin", "viewer", True), ("admin", "technician", True), ("admin", "admin", True),
    ("root", "viewer", False), ("admin", "root", False), (None, "viewer", False),
])
def test_each_role_includes_the_ones_before(role, needed, allowed):
    assert ROLES == ("viewer", "operator", "technician", "admin")
    assert role_allows(role, needed) is allowed


# --------------------------------------------------------------------------- PKI


def test_own_certificate_is_made_on_first_start_and_kept(tmp_path):
    pki = Pki(tmp_path / "pki")
    cert_path, key_path = pki.ensure_own_certificate("urn:open-tempering:server:m1", "plant-host",
                                                     ("127.0.0.1",))
    cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    key = rsa_key(key_path)
    assert key.key_size == 2048 and cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=5 * 365) <= lifetime <= datetime.timedelta(days=5 * 366)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:open-tempering:server:m1"]
    assert san.get_values_for_type(x509.DNSName) == ["plant-host"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    first = cert_path.read_bytes()
    assert pki.ensure_own_certificate("urn:open-tempering:server:m1", "plant-host") == (cert_path, key_path)
    assert cert_path.read_bytes() == first                       # kept on the next start
    pki.ensure_own_certificate("urn:open-tempering:server:m2", "plant-host")
    assert cert_path.read_bytes() != first                       # another application: a new one
    [own] = [e for e in pki.list() if e.state == "own"]
    assert own.thumbprint == hashlib.sha1(cert_path.read_bytes()).hexdigest()


def rsa_key(path: Path) -> rsa.RSAPrivateKey:
    from cryptography.hazmat.primitives import serialization
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def test_thumbprint_is_the_sha1_of_the_der(opcua_client_certificates):
    cert_path, _ = opcua_client_certificates["trusted-client"]
    cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    assert thumbprint(cert) == cert.fingerprint(hashes.SHA1()).hex() == thumbprint(cert_path.read_bytes())


def test_trust_and_reject_move_certificates_between_the_lists(tmp_path, monkeypatch, opcua_client_certificates):
    from opcua_server import security
    pki = Pki(tmp_path / "pki")
    good, _ = opcua_client_certificates["trusted-client"]
    other, _ = opcua_client_certificates["untrusted-client"]
    good_tp, other_tp = thumbprint(good.read_bytes()), thumbprint(other.read_bytes())
    assert pki.list() == []
    assert pki.record_rejected(other.read_bytes()).parent == pki.rejected_dir
    entry = pki.trust(good)                                      # a file: copied in
    assert (entry.state, entry.thumbprint, entry.subject) == ("trusted", good_tp, "CN=trusted-client")
    assert {(e.state, e.thumbprint) for e in pki.list()} == {("trusted", good_tp), ("rejected", other_tp)}
    assert pki.is_trusted(x509.load_der_x509_certificate(good.read_bytes()))
    assert not pki.is_trusted(other.read_bytes())

    pki.trust(other_tp[:10].upper())                              # a rejected one, by a prefix
    assert {(e.state, e.thumbprint) for e in pki.list()} == {("trusted", good_tp), ("trusted", other_tp)}
    assert pki.is_trusted(other.read_bytes())
    assert pki.trust(other_tp).state == "trusted"                # idempotent
    pki.reject(good_tp)
    assert {(e.state, e.thumbprint) for e in pki.list()} == {("rejected", good_tp), ("trusted", other_tp)}
    assert not pki.is_trusted(good.read_bytes())
    assert len(list(pki.rejected_dir.iterdir())) == 1 and len(list(pki.trusted_dir.iterdir())) == 1

    with pytest.raises(NoSuchCertificate):
        pki.trust("0123456789abcdef")
    with pytest.raises(PkiError, match="at least 6 characters"):
        pki.reject(good_tp[:5])
    pki.trust(good)
    with monkeypatch.context() as m:               # two thumbprints starting alike
        m.setattr(security, "thumbprint", lambda cert: "abcdef" + thumbprint(cert))
        with pytest.raises(AmbiguousCertificate):
            pki.reject("abcdef")
    junk = tmp_path / "junk.der"
    junk.write_bytes(b"not a certificate")
    with pytest.raises(BadCertificateFile):
        pki.trust(junk)


def test_a_pem_file_in_trusted_counts(tmp_path, opcua_client_certificates):
    from cryptography.hazmat.primitives import serialization
    pki = Pki(tmp_path / "pki")
    good, _ = opcua_client_certificates["trusted-client"]
    cert = x509.load_der_x509_certificate(good.read_bytes())
    (pki.trusted_dir / "by-hand.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert pki.is_trusted(cert)
    assert [e.state for e in pki.list()] == ["trusted"]


def test_rejected_stops_growing(tmp_path, monkeypatch, opcua_client_certificates):
    from opcua_server import security
    monkeypatch.setattr(security, "MAX_REJECTED", 1)
    pki = Pki(tmp_path / "pki")
    a, _ = opcua_client_certificates["trusted-client"]
    b, _ = opcua_client_certificates["untrusted-client"]
    assert pki.record_rejected(a.read_bytes()) is not None
    assert pki.record_rejected(a.read_bytes()) is not None      # the same one again: kept already
    assert pki.record_rejected(b.read_bytes()) is None
    assert len(list(pki.rejected_dir.iterdir())) == 1


# --------------------------------------------------------------------------- user manager, ruleset


def test_user_manager_refuses_by_default(opcua_pki):
    manager = TemperingUserManager(opcua_pki.records, pki=opcua_pki.pki)
    channel = opcua_pki.client_cert.read_bytes()
    user = manager.get_user(None, "operator", opcua_pki.password("operator"), channel)
    assert isinstance(user, TemperingUser) and user.role == UserRole.User
    assert (user.name, user.tempering_role, user.label) == ("operator", "operator", "operator")
    assert manager.get_user(None, "operator", "wrong-password", channel) is None
    assert manager.get_user(None, "nobody", "whatever-pass", channel) is None
    assert manager.get_user(None, None, None, channel) is None                  # anonymous
    assert manager.get_user(None, "operator", opcua_pki.password("operator"), b"") is None  # None channel
    untrusted = opcua_pki.untrusted_cert.read_bytes()
    assert manager.get_user(None, "operator", opcua_pki.password("operator"), untrusted) is None
    assert [e.thumbprint for e in opcua_pki.pki.list() if e.state == "rejected"] == [thumbprint(untrusted)]
    open_manager = TemperingUserManager(opcua_pki.records, allow_anonymous=True, allow_unsecured=True)
    anonymous = open_manager.get_user(None, None, None, b"")
    assert (anonymous.name, anonymous.tempering_role, anonymous.label) == (None, "viewer", "anonymous")


def test_ruleset_by_role():
    write = ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)
    call = ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)
    read = ua.NodeId(ua.ObjectIds.ReadRequest_Encoding_DefaultBinary)
    add_nodes = ua.NodeId(ua.ObjectIds.AddNodesRequest_Encoding_DefaultBinary)
    rules = TemperingRuleset()

    def user(role):
        return TemperingUser(role=UserRole.User, name=role, tempering_role=role)

    # every role reaches Write and Call: the node or method then checks the role it needs and
    # records the attempt (opcua_server.gate; tests/test_opcua_server.py)
    assert [rules.check_validity(user("viewer"), s, None) for s in (read, write, call)] == [True] * 3
    assert current_user().name == "viewer"
    assert rules.check_validity(user("viewer"), add_nodes, None) is False
    for role in ("operator", "technician", "admin"):
        assert [rules.check_validity(user(role), s, None) for s in (read, write, call)] == [True] * 3
        assert rules.check_validity(user(role), add_nodes, None) is False
    assert rules.check_validity(User(role=UserRole.Admin), read, None) is False   # asyncua's own
    assert current_user() is None


# --------------------------------------------------------------------------- config


def machine_file_with(tmp_path: Path, opcua_yaml: str) -> Path:
    """A copy of the default machine file (and what it names) with another opcua section."""
    text_ = MACHINE_FILE.read_text()
    start = text_.index("\nopcua:\n") + 1
    end = text_.index("\n\n", start)
    for f in MACHINE_FILE.parent.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    path = tmp_path / MACHINE_FILE.name
    path.write_text(text_[:start] + opcua_yaml.rstrip("\n") + text_[end:])
    return path


def test_the_default_opcua_section_is_secure():
    from opcua_server.config import load
    cfg, _ = load(DEFAULT_CONFIG)
    assert cfg.opcua == OpcUaSettings()
    assert cfg.opcua.endpoint == "opc.tcp://127.0.0.1:4840" and cfg.opcua.data_dir == "var/opcua"
    assert cfg.opcua.security_policies == ["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
    assert (cfg.opcua.allow_anonymous, cfg.opcua.allow_none_policy) == (False, False)
    assert cfg.opcua.publish_interval_ms == 100
    assert cfg.opcua.records_url == "sqlite:///var/opcua/tempering.db"
    assert load_all(DEFAULT_CONFIG)[0].machine.id           # the PLC alone ignores the section


@pytest.mark.parametrize("section,message", [
    ("opcua:\n  endpoint: http://127.0.0.1:4840\n",
     "opcua.endpoint: must be opc.tcp://host:port (e.g. opc.tcp://127.0.0.1:4840) (got 'http://127.0.0.1:4840')"),
    ("opcua:\n  endpoint: opc.tcp://127.0.0.1\n", "opcua.endpoint: must be opc.tcp://host:port"),
    ("opcua:\n  endpoint: opc.tcp://0.0.0.0:4840\n  allow_none_policy: true\n",
     "opcua.allow_none_policy: may be true only with a loopback endpoint (127.0.0.1, ::1 or localhost), "
     "not 0.0.0.0"),
    ("opcua:\n  endpoint: opc.tcp://plant-server:4840\n  allow_none_policy: true\n",
     "opcua.allow_none_policy: may be true only with a loopback endpoint"),
    ("opcua:\n  security_policies: [None]\n",
     "opcua.security_policies[0]: must be one of Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss"),
    ("opcua:\n  security_policies: []\n", "opcua.security_policies: must have at least 1 entry"),
    ("opcua:\n  security_policies: [Basic256Sha256, Basic256Sha256]\n",
     "opcua.security_policies: each policy at most once"),
    ("opcua:\n  allow_anonymous: yes\n", "opcua.allow_anonymous: must be true or false"),
    ("opcua:\n  publish_interval_ms: 0\n", "opcua.publish_interval_ms: must be >= 10 (got 0)"),
    ("opcua:\n  passwords: plain\n", "opcua.passwords: unknown field"),
])
def test_bad_opcua_settings_name_the_field(tmp_path, section, message):
    from opcua_server.config import load
    path = machine_file_with(tmp_path, section)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert any(m.startswith(f"{path}: {message}") for m in e.value.messages), e.value.messages


def test_none_policy_is_accepted_on_loopback(tmp_path):
    from opcua_server.config import load
    for host in ("127.0.0.1", "localhost", "[::1]", "127.0.0.2"):
        path = machine_file_with(tmp_path, f"opcua:\n  endpoint: opc.tcp://{host}:4841\n  allow_none_policy: true\n")
        assert load(path)[0].opcua.allow_none_policy


# --------------------------------------------------------------------------- CLI


def users(tmp_path, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main([*argv, "--data-dir", str(tmp_path / "opcua")])


def test_users_commands(tmp_path, monkeypatch, capsys):
    assert users(tmp_path, "users", "list") == 0
    assert "no users yet" in capsys.readouterr().out
    assert users(tmp_path, "users", "add", "alice", "--role", "admin", "--password-stdin",
                 stdin="alice-password\n", monkeypatch=monkeypatch) == 0
    assert users(tmp_path, "users", "add", "bob", "--role", "operator", "--password-stdin",
                 stdin="bob-password\n", monkeypatch=monkeypatch) == 0
    capsys.readouterr()
    assert users(tmp_path, "users", "list") == 0
    assert capsys.readouterr().out.split() == ["alice", "admin", "bob", "operator"]
    assert users(tmp_path, "users", "role", "bob", "technician") == 0
    assert users(tmp_path, "users", "passwd", "bob", "--password-stdin", stdin="bob-new-password\n",
                 monkeypatch=monkeypatch) == 0
    r = Records(f"sqlite:///{tmp_path / 'opcua' / 'tempering.db'}")
    assert r.check_password("bob", "bob-new-password") == "technician"
    assert r.check_password("alice", "alice-password") == "admin"
    capsys.readouterr()

    # mistakes: exit 1, a message, nothing changed
    assert users(tmp_path, "users", "add", "bob", "--role", "viewer", "--password-stdin",
                 stdin="whatever-pw\n", monkeypatch=monkeypatch) == 1
    assert "exists already" in capsys.readouterr().err
    assert users(tmp_path, "users", "add", "carl", "--role", "boss", "--password-stdin",
                 stdin="carl-password\n", monkeypatch=monkeypatch) == 1
    assert "role: must be one of viewer, operator, technician, admin" in capsys.readouterr().err
    assert users(tmp_path, "users", "add", "carl", "--role", "viewer", "--password-stdin",
                 stdin="short\n", monkeypatch=monkeypatch) == 1
    assert "password: must be 8 to" in capsys.readouterr().err
    assert users(tmp_path, "users", "passwd", "nobody", "--password-stdin", stdin="x" * 10,
                 monkeypatch=monkeypatch) == 1
    assert "no such user 'nobody'" in capsys.readouterr().err
    assert users(tmp_path, "users", "delete", "alice") == 1
    assert "last admin" in capsys.readouterr().err
    assert users(tmp_path, "users", "delete", "bob") == 0
    assert r.list_users() == [("alice", "admin")]
    r.close()


def test_users_password_is_asked_twice_on_a_terminal(tmp_path, monkeypatch, capsys):
    import getpass
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stdin", tty)
    answers = iter(["first-password", "other-password", "good-password", "good-password"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert users(tmp_path, "users", "add", "dora", "--role", "viewer") == 1
    assert "the two passwords differ" in capsys.readouterr().err
    assert users(tmp_path, "users", "add", "dora", "--role", "viewer") == 0
    r = Records(f"sqlite:///{tmp_path / 'opcua' / 'tempering.db'}")
    assert r.check_password("dora", "good-password") == "viewer"
    r.close()


def test_users_add_without_a_terminal_needs_password_stdin(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert users(tmp_path, "users", "add", "dora", "--role", "viewer") == 1
    assert "--password-stdin" in capsys.readouterr().err


def test_no_password_option_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        users(tmp_path, "users", "add", "dora", "--role", "viewer", "--password", "on-the-cmdline")


def test_the_tempering_command_reads_the_password_from_stdin(tmp_path):
    exe = Path(sys.executable).parent / "tempering"
    data = tmp_path / "opcua"
    done = subprocess.run([str(exe), "users", "add", "erin", "--role", "operator", "--password-stdin",
                           "--data-dir", str(data)], input="erin-password\n", capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "user erin added (role operator)\n"
    r = Records(f"sqlite:///{data / 'tempering.db'}")
    assert r.check_password("erin", "erin-password") == "operator"
    r.close()


def test_pki_commands(tmp_path, capsys, opcua_client_certificates):
    good, _ = opcua_client_certificates["trusted-client"]
    tp = thumbprint(good.read_bytes())
    data = tmp_path / "opcua"
    assert main(["pki", "list", "--data-dir", str(data)]) == 0
    assert "none yet: made on the server's first start" in capsys.readouterr().out
    Pki(data / "pki").record_rejected(good.read_bytes())       # as the server does
    assert main(["pki", "list", "--data-dir", str(data)]) == 0
    assert f"rejected {tp}  CN=trusted-client" in capsys.readouterr().out
    assert main(["pki", "trust", tp[:12], "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.startswith(f"trusted {tp}  CN=trusted-client")
    assert Pki(data / "pki").is_trusted(good.read_bytes())
    assert main(["pki", "reject", tp, "--data-dir", str(data)]) == 0
    assert not Pki(data / "pki").is_trusted(good.read_bytes())
    assert main(["pki", "trust", "feedbeef", "--data-dir", str(data)]) == 1
    assert "no certificate matches 'feedbeef'" in capsys.readouterr().err
    assert main(["pki", "trust", str(good), "--data-dir", str(data)]) == 0
    assert Pki(data / "pki").is_trusted(good.read_bytes())


# --------------------------------------------------------------------------- a real server


async def connect(client: Client) -> None:
    try:
        await client.connect()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.disconnect()
        raise


async def test_only_secure_endpoints_and_user_names_are_offered(secured_server, opcua_pki):
    client = Client(opcua_pki.settings.endpoint, timeout=5)
    endpoints = await client.connect_and_get_server_endpoints()
    offered = sorted((e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode.name) for e in endpoints)
    assert offered == sorted((p, m) for p in ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")
                             for m in ("Sign", "SignAndEncrypt"))
    for e in endpoints:
        assert [t.TokenType for t in e.UserIdentityTokens] == [ua.UserTokenType.UserName]
        assert e.Server.ApplicationUri == opcua_pki.app_uri
        assert e.ServerCertificate == opcua_pki.pki.cert_path.read_bytes()


async def test_a_trusted_client_with_the_right_password_connects(secured_server, opcua_pki):
    client = await opcua_pki.client("operator")
    await connect(client)
    try:
        assert await client.nodes.server_state.read_value() == ua.ServerState.Running
    finally:
        await client.disconnect()


@pytest.mark.parametrize("policy,mode", [("Aes128_Sha256_RsaOaep", "Sign"),
                                         ("Aes256_Sha256_RsaPss", "SignAndEncrypt"),
                                         ("Basic256Sha256", "Sign")])
async def test_every_offered_policy_works(secured_server, opcua_pki, policy, mode):
    client = await opcua_pki.client("viewer", policy=policy, mode=mode)
    await connect(client)
    try:
        assert await client.nodes.server_state.read_value() == ua.ServerState.Running
    finally:
        await client.disconnect()


@pytest.mark.parametrize("user,password", [("operator", "wrong-password"), ("operator", ""),
                                           ("nobody", "operator-secret-1"), ("admin", "operator-secret-1")])
async def test_a_wrong_password_or_unknown_user_is_refused(secured_server, opcua_pki, user, password):
    client = await opcua_pki.client(user, password)
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):
        await connect(client)


async def test_an_anonymous_session_is_refused(secured_server, opcua_pki):
    client = await opcua_pki.client()
    with pytest.raises(ua.uaerrors.BadIdentityTokenRejected):
        await connect(client)


async def test_an_untrusted_client_certificate_is_refused_until_trusted(secured_server, opcua_pki):
    client = await opcua_pki.client("admin", trusted=False)
    with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
        await connect(client)
    tp = thumbprint(opcua_pki.untrusted_cert.read_bytes())
    rejected = [e for e in opcua_pki.pki.list() if e.state == "rejected"]
    assert [(e.thumbprint, e.subject) for e in rejected] == [(tp, "CN=untrusted-client")]
    assert main(["pki", "trust", tp, "--data-dir", opcua_pki.settings.data_dir]) == 0
    client = await opcua_pki.client("admin", trusted=False)      # no restart needed
    await connect(client)
    await client.disconnect()


async def test_a_client_certificate_for_another_application_is_refused(secured_server, opcua_pki):
    client = await opcua_pki.client("operator")
    client.application_uri = "urn:somebody-else"
    with pytest.raises(ua.uaerrors.BadCertificateUriInvalid):
        await connect(client)


async def test_a_session_on_an_unsecured_channel_is_refused(secured_server, opcua_pki):
    """The None endpoint is not offered; a client that opens a None channel anyway (asyncua
    allows one for discovery) and creates a session on it cannot activate it."""
    client = Client(opcua_pki.settings.endpoint, timeout=5)
    client.set_user("operator")
    client.set_password(opcua_pki.password("operator"))
    with pytest.raises(ua.UaError, match="No matching endpoints"):
        await connect(client)
    client = Client(opcua_pki.settings.endpoint, timeout=5)
    client.application_uri = opcua_pki.client_uri
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        await raw_session(client, opcua_pki)
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await client.activate_session("operator", opcua_pki.password("operator"))
        with pytest.raises(ua.uaerrors.BadSessionNotActivated):
            await client.nodes.server_state.read_value()
    finally:
        client.disconnect_socket()


async def raw_session(client: Client, opcua_pki: OpcUaTestPki) -> None:
    """CreateSession without the client-side checks of Client.create_session."""
    params = ua.CreateSessionParameters()
    params.ClientDescription = ua.ApplicationDescription(ApplicationUri=opcua_pki.client_uri,
                                                         ApplicationType=ua.ApplicationType.Client)
    params.ClientCertificate = client.security_policy.host_certificate or None
    params.ClientNonce = os.urandom(32)
    params.EndpointUrl = opcua_pki.settings.endpoint
    params.SessionName = "raw"
    params.RequestedSessionTimeout = 60_000
    response = await client.uaclient.create_session(params)
    client._server_nonce = response.ServerNonce
    secure = [e for e in response.ServerEndpoints if e.SecurityMode == ua.MessageSecurityMode.SignAndEncrypt]
    client._policy_ids = secure[0].UserIdentityTokens


async def test_the_channel_certificate_must_be_trusted_too(secured_server, opcua_pki):
    """A client that signs its channel with an untrusted certificate but names a trusted one
    in CreateSession passes asyncua's CreateSession check; the user manager refuses it."""
    client = await opcua_pki.client("admin", trusted=False)
    await client.connect_socket()
    try:
        await client.send_hello()
        await client.open_secure_channel()
        channel_cert = client.security_policy.host_certificate
        client.security_policy.host_certificate = opcua_pki.client_cert.read_bytes()   # the lie
        await raw_session(client, opcua_pki)
        client.security_policy.host_certificate = channel_cert
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await client.activate_session("admin", opcua_pki.password("admin"))
    finally:
        client.disconnect_socket()
    assert thumbprint(opcua_pki.untrusted_cert.read_bytes()) in {
        e.thumbprint for e in opcua_pki.pki.list() if e.state == "rejected"}


async def test_handlers_see_the_sessions_user_and_nobody_adds_nodes(opcua_pki):
    server = Server()
    await server.init()
    ns = await server.register_namespace("urn:test")
    seen = []

    async def whoami(parent):
        user = current_user()
        seen.append((user.name, user.tempering_role))
        return [ua.Variant(f"{user.name}:{user.tempering_role}", ua.VariantType.String)]

    def store(node, attr, value):            # a write's value setter (called synchronously)
        user = current_user()
        writes.append((user.name, user.tempering_role, value.Value.Value))
        node.attributes[attr].value = value

    writes = []
    method = await server.nodes.objects.add_method(ns, "WhoAmI", whoami, [], [ua.VariantType.String])
    setting = await server.nodes.objects.add_variable(ns, "Setting", 1.0)
    await setting.set_writable()
    server.set_attribute_value_setter(setting.nodeid, store)
    await configure_security(server, opcua_pki.settings, opcua_pki.records, opcua_pki.pki,
                             app_uri=opcua_pki.app_uri)
    async with server:
        for role in ("operator", "admin"):
            client = await opcua_pki.client(role)
            await connect(client)
            try:
                assert await client.nodes.objects.call_method(method.nodeid) == f"{role}:{role}"
                await client.get_node(setting.nodeid).write_value(2.0)
            finally:
                await client.disconnect()
        client = await opcua_pki.client("viewer")
        await connect(client)
        try:
            assert await client.get_node(setting.nodeid).read_value() == 2.0
            # the handler sees the viewer (and the gate's per-method role check refuses it)
            assert await client.nodes.objects.call_method(method.nodeid) == "viewer:viewer"
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await client.nodes.objects.add_folder(ns, "Nope")
        finally:
            await client.disconnect()
    assert seen == [("operator", "operator"), ("admin", "admin"), ("viewer", "viewer")]
    assert writes == [("operator", "operator", 2.0), ("admin", "admin", 2.0)]


async def test_anonymous_and_none_policy_only_when_allowed_on_loopback(opcua_pki, capsys):
    settings = opcua_pki.settings.model_copy(update={"allow_anonymous": True, "allow_none_policy": True})
    server = Server()
    await server.init()
    await configure_security(server, settings, opcua_pki.records, opcua_pki.pki, app_uri=opcua_pki.app_uri)
    assert "WARNING: the OPC UA endpoint" in capsys.readouterr().err
    async with server:
        client = Client(settings.endpoint, timeout=5)
        endpoints = await client.connect_and_get_server_endpoints()
        assert ("None", "None_") in {(e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode.name)
                                     for e in endpoints}
        client = Client(settings.endpoint, timeout=5)           # None, anonymous: a viewer
        await connect(client)
        try:
            assert await client.nodes.server_state.read_value() == ua.ServerState.Running
            with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                await client.nodes.server_state.write_value(ua.ServerState.Shutdown)
        finally:
            await client.disconnect()
    with pytest.raises(ValueError, match="loopback"):
        remote = OpcUaSettings.model_construct(**{**settings.model_dump(), "endpoint": "opc.tcp://0.0.0.0:4840"})
        await configure_security(Server(), remote, opcua_pki.records, opcua_pki.pki)


def test_a_verified_login_is_remembered_briefly_a_wrong_one_never(tmp_path):
    from opcua_server.records import Records
    from opcua_server.security import TemperingUserManager

    records = Records(f"sqlite:///{tmp_path / 'r.db'}")
    records.add_user("alice", "right-password", "operator")
    now = [0.0]
    calls = []
    check = records.check_password
    records.check_password = lambda n, p: calls.append(n) or check(n, p)
    um = TemperingUserManager(records, allow_unsecured=True, clock=lambda: now[0])
    assert um.get_user(None, "alice", "right-password").tempering_role == "operator"
    assert um.get_user(None, "alice", "right-password").tempering_role == "operator"
    assert calls == ["alice"]                                   # the second login: no scrypt
    assert um.get_user(None, "alice", "wrong-password") is None
    assert calls == ["alice", "alice"]                          # a wrong one always pays
    assert um.get_user(None, "alice", "right-password") is not None   # forgot the good one
    assert len(calls) == 3
    records.set_role("alice", "viewer")
    assert um.get_user(None, "alice", "right-password").tempering_role == "viewer"
    now[0] += um.VERIFIED_TTL_S + 1
    assert um.get_user(None, "alice", "right-password") is not None
    assert len(calls) == 4                                      # expired: checked again
    records.close()
