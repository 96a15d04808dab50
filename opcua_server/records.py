"""The server's records in SQL: users, recipes, the audit trail, the alarm journal and the
batch records (SQLAlchemy 2.x Core, sync).

One job: keep what must survive a restart and be shared by the OPC UA server and the
``tempering users`` commands. SQLite by default (``<data_dir>/tempering.db``), PostgreSQL in a
plant (``postgresql+psycopg://user:password@host/db``); the same code and the same tests run
against both. Several machines may share one database (a plant's PostgreSQL): a ``Records``
opened with a machine id writes that id into every audit, journal and batch row and reads only
that machine's rows; users are the database's, shared by every machine on it (a plant's
people); the recipe book is the machine's own or a plant library (``book_of``). Tables
(created on first use):

- ``users``: name, role (one of ROLES), password hash, must_change. Passwords are never
  stored: only ``scrypt$<n>$<r>$<p>$<salt>$<key>`` (hashlib.scrypt, RFC 7914, a random 16-byte
  salt per user and per password change, base64); a check derives the key again and compares it
  in constant time (``hmac.compare_digest``). An unknown user costs the same derivation, so the
  time of a refusal does not tell whether the name exists. New hashes use SCRYPT_COST (OWASP
  Password Storage Cheat Sheet minimum: N=2^17, r=8, p=1: 128 MiB, about 0.5 s on a small CPU);
  a hash made with other parameters (the earlier N=2^14) still verifies, and is made again with
  SCRYPT_COST at the user's next successful login. So is an ``aspnet$<base64>`` hash, the one
  other kind stored: an ASP.NET Identity password hash imported from a legacy machine
  (``legacy_password``; V2: PBKDF2-HMAC-SHA1, 1000 iterations; V3: PBKDF2-HMAC-SHA1/256/512
  with the iteration count in the hash, at most MAX_PBKDF2_ITERATIONS), verified with
  hashlib.pbkdf2_hmac and ``hmac.compare_digest`` at the first login, then replaced. must_change
  (schema 5; NULL in older rows: False): the user logs in with a one-time password (or a legacy
  one below the rules) and may do nothing but read, browse, subscribe and set a new password
  (OPC UA Part 18 §5.2.8 ChangePassword: ``change_password``) until he has; ``set_password``
  (an admin's ``tempering users passwd``) clears it too.
- ``recipes``: one row per recipe of a book, one column per field of ``plc.config.Recipe``,
  validated through that model before they are written and again when they are read;
  ``acceptance`` (the recipe's acceptance criteria) as JSON, NULL in rows made before it: the
  defaults (schema 4). ``book`` (schema 6; key (book, id)): ``machine:<id>``, a machine's own
  recipes, or ``library:<name>``, a library shared by the machines whose ``opcua.recipe_library``
  names it; "" in rows made before it, until a machine opens the database (``_claim``).
- ``audit``: one row per operator action (an OPC UA write or method call) and per login:
  time (ISO 8601, UTC), user, action, target (node or method), old value, new value, result
  (StatusCode name), and, where they apply, the PLC command it became (command_id), where it
  came from (origin), the client's address (peer, ``host:port``) and certificate thumbprint
  (certificate); all as text, NULL where not given. Databases made before these four columns
  get them added on open (schema 2). machine (schema 6): the machine's id; NULL in older rows
  until the first machine to open the database after takes them (``_claim``).
- ``alarm_journal``: one row per alarm transition the PLC reported (``plc.commands.Event`` of
  kind "alarm") and per PLC start ("alarm_system", kind "restart"): time (ISO 8601, UTC, to the
  microsecond, so the text sorts as the time), machine, alarm_id, kind (the transition: "active",
  "cleared", "acknowledged", "confirmed", "comment", "shelved", "unshelved", "disabled",
  "enabled", "suppressed", "unsuppressed", "message"; or "restart"), state (the
  ``plc.alarms.AlarmState`` value after it), active, acked, confirmed, enabled, shelving,
  severity (the priority, 1..1000), message, comment, user, value, batch_id, recipe_id, event_id
  (the alarm's OPC UA EventId as hex; "" on restart rows). An event is stored once however often
  it is handed in (a new plant window gets the events its predecessor did not acknowledge
  again): (machine, alarm_id, kind, time, event_id) is unique and a repeat is skipped (schema 3).
- ``batches``: one row per batch record (``opcua_server.batches.BatchRecord``): batch_id
  (unique), machine, seq (the number at the end of ``<machine>-NNNNNN``, NULL for an id of
  another form), recipe_id, started_at and ended_at (seconds since the epoch), outcome, verdict
  (PASS, FAIL, INCOMPLETE), reasons (JSON list of text) and the whole record (JSON of
  ``to_dict``). Saving a batch again replaces its row. The summary columns answer lists and
  filters without reading the record's JSON; ``next_batch_seq`` is the machine's highest seq + 1:
  the floor of the PLC's batch numbering, so a machine whose PLC state file is new (a restored
  or migrated PLC) does not reuse a batch id (schema 4).
- ``meta``: key/value (schema version; per book, whether it was seeded from a recipes.yaml:
  ``recipes_seeded:<book>``).

The schema version is checked at open: an older database is migrated (logged "records schema
N -> M"); a newer one (written by a newer program) is refused with SchemaTooNew before anything
is written; ``check_schema(url)`` checks without opening.

Errors (RecordsError and its subclasses; each carries the data at fault):
    RecordsError(Exception)
        InvalidUser(RecordsError, ValueError)   .field ("name", "password", "role"), .message
            SamePassword(InvalidUser)           a new password that is the old one
        WrongPassword(RecordsError)             .name: the old password given is not the user's
        NoSuchUser(RecordsError, KeyError)      .name
        UserExists(RecordsError)                .name
        LastAdmin(RecordsError)                 .name: the one admin left cannot go
        InvalidRecipe(RecordsError, ValueError) .recipe_id, .messages ("recipes.<id>.<field>: ...")
        NoSuchRecipe(RecordsError, KeyError)    .recipe_id
        SchemaTooNew(RecordsError)              .url, .found, .supported: a newer program's database
Database failures are SQLAlchemy's (``sqlalchemy.exc.OperationalError``...), unchanged.

Calls block on the database (an fsync on SQLite; a round trip on PostgreSQL; about 0.5 s and
128 MiB of scrypt in ``check_password``, add_user, set_password, twice in change_password;
``legacy_password`` of a plain password): from asyncio code, call
them with ``asyncio.to_thread`` (hashlib.scrypt releases the GIL). ``journal_alarms`` writes
any number of events in one transaction (a flood of hundreds a second is one insert a batch),
``import_users`` any number of users (all or none).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from pydantic import ValidationError
from sqlalchemy import (Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, delete, func, insert, inspect, select, update)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url

from plc.config import Recipe, RecipeBook
from plc.configbase import _messages

from .batches import VERDICTS, BatchRecord

log = logging.getLogger(__name__)

#: The roles, each with the rights of the ones before it (security.role_allows).
ROLES: tuple[str, ...] = ("viewer", "operator", "technician", "admin")

SCHEMA_VERSION = "6"     # 2: audit.command_id, origin, peer, certificate; 3: alarm_journal; 4: batches;
                         # 5: users.must_change; 6: audit.machine, recipes.book (key: book, id)
USER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024


class ScryptCost(NamedTuple):
    """scrypt's cost parameters (RFC 7914): N (CPU/memory, a power of 2), r (block size),
    p (parallelism). Memory: 128 * r * N bytes."""

    n: int
    r: int
    p: int


#: The cost of new hashes: the OWASP Password Storage Cheat Sheet's minimum for scrypt (N=2^17,
#: r=8, p=1): 128 MiB and about 0.5 s per derivation on a small CPU. Stored with each hash, so
#: changing it keeps the old hashes readable (they are re-hashed at the next successful login).
#: Tests may lower it (monkeypatch this name); nothing else should.
SCRYPT_COST = ScryptCost(2 ** 17, 8, 1)
_KEY_BYTES, _SALT_BYTES = 32, 16
#: No stored hash may ask for more memory than this (a hash changed behind our back to
#: N=2^30 would otherwise cost 128 GiB): such a hash is refused like a wrong password.
MAX_SCRYPT_MEMORY = 512 * 1024 * 1024


def scrypt_memory(cost: ScryptCost) -> int:
    """The ``maxmem`` that ``hashlib.scrypt`` needs for ``cost``: OpenSSL counts the block V
    (128 * r * (N + 2) bytes) and B (128 * r * p bytes); one MiB of margin."""
    n, r, p = cost
    return 128 * r * (n + 2) + 128 * r * p + 1024 * 1024


class RecordsError(Exception):
    """A refused change or lookup of the records (the request is at fault, nothing changed)."""


class InvalidUser(RecordsError, ValueError):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class SamePassword(InvalidUser):
    def __init__(self):
        super().__init__("password", "the new password must differ from the old one")


class WrongPassword(RecordsError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"wrong password for {name!r}")


class NoSuchUser(RecordsError, KeyError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:
        return f"no such user {self.name!r}"


class UserExists(RecordsError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"user {name!r} exists already")


class LastAdmin(RecordsError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"{name!r} is the last admin: add another admin first")


class InvalidRecipe(RecordsError, ValueError):
    def __init__(self, recipe_id: str, messages: list[str]):
        self.recipe_id, self.messages = recipe_id, list(messages)
        super().__init__("\n".join(self.messages))


class SchemaTooNew(RecordsError):
    """The database's records schema is newer than this program's (or not a number): written by
    a newer version of the program, whose tables this one would misread or damage. Nothing was
    written. ``.url`` (without password), ``.found``, ``.supported``."""

    def __init__(self, url: str, found: str):
        self.url, self.found, self.supported = url, found, SCHEMA_VERSION
        super().__init__(
            f"the records database {url} has schema {found}, newer than this program's schema "
            f"{SCHEMA_VERSION}: a newer version of the program has used it. Run that version here "
            f"too (every machine sharing the database needs it), or give this machine another "
            f"database (opcua.database_url); nothing was written")


class NoSuchRecipe(RecordsError, KeyError):
    def __init__(self, recipe_id: str):
        self.recipe_id = recipe_id
        super().__init__(recipe_id)

    def __str__(self) -> str:
        return f"no such recipe {self.recipe_id!r}"


# --------------------------------------------------------------------------- schema

_metadata = MetaData()

users = Table(
    "users", _metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("password_hash", String(256), nullable=False),
    Column("must_change", Boolean),     # schema 5: must set a new password; NULL (older rows): False
)

recipes = Table(
    "recipes", _metadata,
    Column("book", String(128), primary_key=True, default=""),  # schema 6: book_of(); "": unclaimed
    Column("id", String(64), primary_key=True),
    Column("name", Text, nullable=False),
    Column("heating_goal", Float, nullable=False),
    Column("cooling_goal", Float, nullable=False),
    Column("pouring_goal", Float, nullable=False),
    Column("working_max", Float, nullable=False),
    Column("mixer_enabled", Boolean, nullable=False),
    Column("fountain_enabled", Boolean, nullable=False),
    Column("mold_heater_enabled", Boolean, nullable=False),
    Column("vibration_enabled", Boolean, nullable=False),
    Column("vib_heater_enabled", Boolean, nullable=False),
    Column("pedal", String(16), nullable=False),
    Column("pedal_on_time", Float, nullable=False),
    Column("pedal_off_time", Float, nullable=False),
    Column("acceptance", Text),     # schema 4: JSON of the AcceptanceCriteria; NULL: the defaults
)
_RECIPE_JSON = ("acceptance",)      # recipe fields that are models, stored as JSON text

audit_log = Table(
    "audit", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Text, nullable=False),
    Column("user_name", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("old_value", Text),
    Column("new_value", Text),
    Column("result", Text, nullable=False),
    Column("command_id", Text),     # schema 2: the PLC command an accepted action became
    Column("origin", Text),         # schema 2: where the action came from
    Column("peer", Text),           # schema 2: the client's host:port (logins)
    Column("certificate", Text),    # schema 2: the client certificate's thumbprint (logins)
    Column("machine", Text),        # schema 6: the machine's id; NULL: not claimed yet
    Index("audit_machine", "machine", "id"),
)
_AUDIT_SINCE_2 = ("command_id", "origin", "peer", "certificate")

alarm_journal = Table(      # schema 3
    "alarm_journal", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", String(32), nullable=False),        # ISO 8601 UTC, microseconds: sorts as time
    Column("machine", String(64), nullable=False),
    Column("alarm_id", String(128), nullable=False),   # "" on restart rows
    Column("kind", String(32), nullable=False),
    Column("state", String(48), nullable=False),       # AlarmState value after; "" on restart rows
    Column("active", Boolean),                         # NULL on restart rows
    Column("acked", Boolean),
    Column("confirmed", Boolean),
    Column("enabled", Boolean),
    Column("shelving", String(16)),
    Column("severity", Integer, nullable=False),
    Column("message", Text, nullable=False),
    Column("comment", Text, nullable=False),
    Column("user_name", Text, nullable=False),
    Column("value", Float),
    Column("batch_id", Text),
    Column("recipe_id", Text),
    Column("event_id", String(512), nullable=False),   # hex of Alarm.event_id; "" on restart rows
    UniqueConstraint("machine", "alarm_id", "kind", "time", "event_id", name="alarm_journal_event"),
    Index("alarm_journal_time", "time", "id"),
    Index("alarm_journal_alarm", "alarm_id", "time"),
    Index("alarm_journal_batch", "batch_id", "time"),
)

batches = Table(            # schema 4
    "batches", _metadata,
    Column("batch_id", String(128), primary_key=True),
    Column("machine", String(64), nullable=False),
    Column("seq", Integer),                            # NNNNNN of <machine>-NNNNNN, else NULL
    Column("recipe_id", String(64), nullable=False),
    Column("started_at", Float, nullable=False),       # seconds since the epoch
    Column("ended_at", Float, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("verdict", String(16), nullable=False),
    Column("reasons", Text, nullable=False),           # JSON list of text
    Column("record", Text, nullable=False),            # JSON of BatchRecord.to_dict()
    Index("batches_started", "started_at"),
    Index("batches_verdict", "verdict", "started_at"),
    Index("batches_machine_seq", "machine", "seq"),
)


#: The event kinds that go to the alarm journal.
JOURNAL_KINDS: frozenset[str] = frozenset({"alarm", "alarm_system"})

meta = Table(
    "meta", _metadata,
    Column("key", String(200), primary_key=True),   # 64 before schema 6
    Column("value", Text, nullable=False),
)

#: The recipe's fields, as columns (a JSON column the Recipe does not have yet is left alone).
RECIPE_FIELDS: tuple[str, ...] = tuple(c.name for c in recipes.columns
                                       if c.name not in ("book", "id") and c.name in Recipe.model_fields)
assert set(RECIPE_FIELDS) == set(Recipe.model_fields), "recipes table out of step with plc.config.Recipe"


# --------------------------------------------------------------------------- passwords


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$key`` of ``password`` with a fresh random salt, at SCRYPT_COST."""
    cost = SCRYPT_COST
    salt = os.urandom(_SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=cost.n, r=cost.r, p=cost.p,
                         dklen=_KEY_BYTES, maxmem=scrypt_memory(cost))
    return f"scrypt${cost.n}${cost.r}${cost.p}${_b64(salt)}${_b64(key)}"


def hash_cost(stored: str) -> ScryptCost | None:
    """The cost parameters of a stored hash (None: not one of ours)."""
    try:
        scheme, n, r, p, _salt, _key = stored.split("$")
        return ScryptCost(int(n), int(r), int(p)) if scheme == "scrypt" else None
    except ValueError:
        return None


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` derives the key of ``stored`` (``scrypt$...``, or an imported
    ``aspnet$...``); the keys are compared in constant time. A malformed ``stored`` is False
    (after the work of SCRYPT_COST, so it times like a refusal); one asking for more than
    MAX_SCRYPT_MEMORY or MAX_PBKDF2_ITERATIONS is False at once."""
    aspnet = _aspnet_hash(stored[len(ASPNET_PREFIX):]) if stored.startswith(ASPNET_PREFIX) else None
    if aspnet is not None:
        if aspnet.iterations > MAX_PBKDF2_ITERATIONS:
            return False
        derived = hashlib.pbkdf2_hmac(aspnet.prf, password.encode("utf-8", "surrogatepass"),
                                      aspnet.salt, aspnet.iterations, len(aspnet.subkey))
        return hmac.compare_digest(derived, aspnet.subkey)
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        cost = ScryptCost(int(n), int(r), int(p))
        salt_b, key_b = base64.b64decode(salt, validate=True), base64.b64decode(key, validate=True)
    except ValueError:
        cost, salt_b, key_b = SCRYPT_COST, b"\0" * _SALT_BYTES, b""
    if scrypt_memory(cost) > MAX_SCRYPT_MEMORY:
        return False
    try:
        derived = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt_b, n=cost.n,
                                 r=cost.r, p=cost.p, dklen=len(key_b) or _KEY_BYTES,
                                 maxmem=scrypt_memory(cost))
    except ValueError:               # cost parameters out of range: not a hash of ours
        return False
    return hmac.compare_digest(derived, key_b)


# --------------------------------------------------------------------------- legacy passwords

#: The prefix of an imported ASP.NET Identity hash in ``users.password_hash``.
ASPNET_PREFIX = "aspnet$"
#: No imported PBKDF2 hash may ask for more iterations than this (a hostile hash would otherwise
#: hold a login for minutes): such a hash is not kept on import, and refused like a wrong password.
MAX_PBKDF2_ITERATIONS = 10_000_000
_ASPNET_PRF = {0: "sha1", 1: "sha256", 2: "sha512"}     # ASP.NET Core KeyDerivationPrf
_ASPNET_V2 = (0x00, 16, 32)                             # marker, salt and subkey bytes
_ASPNET_V3_KEY = (16, 64)                               # salt and subkey bytes, least and most


class _AspNetHash(NamedTuple):
    version: str        # "v2" or "v3"
    prf: str            # hashlib name
    iterations: int
    salt: bytes
    subkey: bytes


def _aspnet_hash(text: str) -> _AspNetHash | None:
    """The parts of an ASP.NET Identity password hash (``PasswordHasher``, base64), None if
    ``text`` is not exactly one: canonical base64; V2: 0x00, a 16-byte salt, a 32-byte
    PBKDF2-HMAC-SHA1 subkey (1000 iterations), 49 bytes in all; V3: 0x01, then big-endian
    uint32s prf (0 SHA-1, 1 SHA-256, 2 SHA-512), iteration count (>= 1) and salt length, the
    salt and the subkey (the rest), each 16 to 64 bytes."""
    if not isinstance(text, str) or not 60 <= len(text) <= 200:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if _b64(raw) != text:
        return None
    marker, salt_bytes, key_bytes = _ASPNET_V2
    if raw[0] == marker and len(raw) == 1 + salt_bytes + key_bytes:
        return _AspNetHash("v2", "sha1", 1000, raw[1:1 + salt_bytes], raw[1 + salt_bytes:])
    if raw[0] != 0x01 or len(raw) < 13:
        return None
    prf, iterations, salt_len = struct.unpack(">III", raw[1:13])
    least, most = _ASPNET_V3_KEY
    key_len = len(raw) - 13 - salt_len
    if prf not in _ASPNET_PRF or iterations < 1 or not (least <= salt_len <= most and least <= key_len <= most):
        return None
    return _AspNetHash("v3", _ASPNET_PRF[prf], iterations, raw[13:13 + salt_len], raw[13 + salt_len:])


#: Hashes of schemes this server cannot verify (scheme name, pattern of the whole text).
_UNVERIFIABLE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("bcrypt", re.compile(r"^\$2[abxy]?\$\d{2}\$[./A-Za-z0-9]{53}$")),
    ("argon2", re.compile(r"^\$argon2(id|i|d)\$(v=\d+\$)?m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$")),
    ("md5-crypt", re.compile(r"^\$(1|apr1)\$[./A-Za-z0-9]{1,8}\$[./A-Za-z0-9]{22}$")),
    ("sha256-crypt", re.compile(r"^\$5\$(rounds=\d+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{43}$")),
    ("sha512-crypt", re.compile(r"^\$6\$(rounds=\d+\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}$")),
    ("ldap", re.compile(r"^\{(S?SHA(256|384|512)?|S?MD5|CRYPT|PBKDF2(-SHA\d+)?|ARGON2|BCRYPT)\}\S+$", re.I)),
    ("unknown-digest", re.compile(r"^([0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{56}|[0-9a-fA-F]{64}|"
                                  r"[0-9a-fA-F]{96}|[0-9a-fA-F]{128})$")),
)
_DIGEST_BYTES = frozenset({16, 20, 28, 32, 48, 64})     # MD5, SHA-1, SHA-224/256/384/512


class LegacyPassword(NamedTuple):
    """What becomes of a legacy Users.csv password cell (``legacy_password``): ``scheme`` (what
    the cell holds), ``password_hash`` (what to store: ``scrypt$...``, ``aspnet$...``; None: the
    user gets a one-time password, ``new_one_time_password``), ``note`` (why, for the migration
    report), ``must_change`` (the user must set a new password at the first login)."""

    scheme: str
    password_hash: str | None
    note: str
    must_change: bool = False


def legacy_password(text: str) -> LegacyPassword:
    """Classify a legacy machine's password cell (the .NET application's Users.csv) and make
    what to store of it. Never keeps a password as it was:

    - "" -> scheme "none": no hash, a one-time password, must change.
    - an ASP.NET Identity password hash (``_aspnet_hash``: the exact V2 or V3 layout, so a
      plain password is never taken for one) -> "aspnet-identity-v2" / "aspnet-identity-v3",
      kept as ``aspnet$<base64>``, verified at the first login and then hashed again with
      scrypt; one of more than MAX_PBKDF2_ITERATIONS is not kept (a one-time password).
    - a hash this server cannot verify -> "bcrypt", "argon2", "md5-crypt", "sha256-crypt",
      "sha512-crypt", "ldap" ({SSHA}, {SHA}, ...), "unknown-digest" (a bare MD5/SHA-x digest in
      hex or base64: which one, and whether salted, cannot be told): no hash, a one-time
      password, must change. Taking one of these for a plain password would make the hash
      itself a password that logs in.
    - anything else -> "plain": ``hash_password`` of the text exactly as given (scrypt); one
      shorter than MIN_PASSWORD_LENGTH still works (the legacy system allowed it) but must be
      changed at the first login; one longer than MAX_PASSWORD_LENGTH could never be typed at a
      login: a one-time password instead.

    Hashes are recognised on the text without surrounding white space (no hash has any)."""
    if text == "":
        return LegacyPassword("none", None, "no password: a one-time password, to be changed at "
                                            "the first login", True)
    bare = text.strip()
    aspnet = _aspnet_hash(bare)
    if aspnet is not None:
        scheme = f"aspnet-identity-{aspnet.version}"
        what = f"ASP.NET Identity {aspnet.version.upper()} (PBKDF2-HMAC-{aspnet.prf.upper()}, " \
               f"{aspnet.iterations} iterations)"
        if aspnet.iterations > MAX_PBKDF2_ITERATIONS:
            return LegacyPassword(scheme, None, f"{what}: more than {MAX_PBKDF2_ITERATIONS} iterations, "
                                                "not verified: a one-time password", True)
        return LegacyPassword(scheme, ASPNET_PREFIX + bare,
                              f"{what}: kept, verified at the first login, then hashed with scrypt")
    for scheme, pattern in _UNVERIFIABLE:
        found = pattern.match(bare)
        if found and scheme == "ldap":
            scheme = f"ldap-{found.group(1).lower()}"
        if found or (scheme == "unknown-digest" and _base64_digest(bare)):
            return LegacyPassword(scheme, None, f"{scheme} hash: cannot be verified here: a "
                                                "one-time password, to be changed at the first login", True)
    if len(text) > MAX_PASSWORD_LENGTH:
        return LegacyPassword("plain", None, f"longer than {MAX_PASSWORD_LENGTH} characters: a "
                                             "one-time password, to be changed at the first login", True)
    if len(text) < MIN_PASSWORD_LENGTH:
        return LegacyPassword("plain", hash_password(text),
                              f"shorter than {MIN_PASSWORD_LENGTH} characters: hashed with scrypt, "
                              "to be changed at the first login", True)
    return LegacyPassword("plain", hash_password(text), "hashed with scrypt")


def _base64_digest(text: str) -> bool:
    """Canonical base64 of exactly a digest's length (16, 20, 28, 32, 48 or 64 bytes)."""
    if not 24 <= len(text) <= 88:
        return False
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) in _DIGEST_BYTES and _b64(raw) == text


#: The one-time password's characters: letters and digits less the ones read alike (0 O o 1 l I).
_OTP_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"


def new_one_time_password() -> str:
    """A one-time password for a user who must set his own at the first login: 20 characters
    (``secrets``; 55 symbols, about 115 bits) in groups of four (``abcd-efgh-...``, 24
    characters)."""
    chars = "".join(secrets.choice(_OTP_ALPHABET) for _ in range(20))
    return "-".join(chars[i:i + 4] for i in range(0, 20, 4))


class ImportedUser(NamedTuple):
    """One user for ``Records.import_users``: ``password_hash`` is a hash of ours
    (``scrypt$...`` or ``aspnet$...``), never a password."""

    name: str
    role: str
    password_hash: str
    must_change: bool


def _check_hash(password_hash: object) -> str:
    if isinstance(password_hash, str):
        if password_hash.startswith(ASPNET_PREFIX) and _aspnet_hash(password_hash[len(ASPNET_PREFIX):]):
            return password_hash
        if hash_cost(password_hash) is not None and len(password_hash) <= 256:
            return password_hash
    raise InvalidUser("password", "must be a hash of ours (scrypt$... or aspnet$...), never a password")


def _dummy_hash() -> str:
    """A stored hash at SCRYPT_COST that no password matches (a random key: one in 2^256),
    checked against for unknown users: the same cost as a real, current one."""
    return _dummy_hash_at(SCRYPT_COST)


@functools.cache
def _dummy_hash_at(cost: ScryptCost) -> str:
    salt, key = os.urandom(_SALT_BYTES), os.urandom(_KEY_BYTES)
    return f"scrypt${cost.n}${cost.r}${cost.p}${_b64(salt)}${_b64(key)}"


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not USER_NAME.match(name):
        raise InvalidUser("name", "must be 1 to 64 of letters, digits and . _ @ -")
    return name


def _check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidUser("role", f"must be one of {', '.join(ROLES)} (got {role!r})")
    return role  # type: ignore[return-value]


def _check_password(password: object) -> str:
    if not isinstance(password, str):
        raise InvalidUser("password", "must be text")
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidUser("password", f"must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters")
    return password


# --------------------------------------------------------------------------- recipes


def validate_recipe(recipe_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's fields after ``plc.config.Recipe`` (and the id's slug rule) checked them,
    as plain values; InvalidRecipe with one ``recipes.<id>.<field>: ...`` line per problem."""
    data = {"recipes": {recipe_id: dict(fields)}}
    try:
        book = RecipeBook.model_validate(data)
    except ValidationError as exc:
        lines = [line.split(": ", 1)[1] for line in _messages("records", exc, data)]
        raise InvalidRecipe(recipe_id, lines) from None
    return book.recipes[recipe_id].model_dump()


def _recipe_row(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The recipes row of validated fields: the model fields (acceptance) as JSON text."""
    return {k: (json.dumps(v, sort_keys=True) if k in _RECIPE_JSON else v) for k, v in fields.items()}


def _utc_text(time_s: float) -> str:
    return datetime.fromtimestamp(time_s, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: object) -> str | None:
    return None if value is None else str(value)


# --------------------------------------------------------------------------- alarm journal


def _utc_text_us(time_s: float) -> str:
    """ISO 8601 UTC to the microsecond, fixed width (``2026-03-01T09:30:00.250000Z``): the
    journal's time column, whose text order is the time order."""
    return datetime.fromtimestamp(time_s, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _epoch_s(when: datetime | float | int) -> float:
    """Seconds since the epoch of a datetime (naive: taken as UTC) or of a number of seconds."""
    if isinstance(when, datetime):
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return float(when)
    raise TypeError(f"a time must be a datetime or seconds since the epoch, got {when!r}")


@dataclass(frozen=True, slots=True)
class JournalRow:
    """One row of the alarm journal (see the module docstring for the meaning of each field).

    ``time`` is timezone-aware UTC (the alarm's ``changed``: when the PLC reported the change);
    ``active``, ``acked``, ``confirmed``, ``enabled`` and ``shelving`` are None on "restart"
    rows (no alarm); ``severity`` is the priority (``plc.alarms.Priority``, 1..1000);
    ``event_id`` the hex of the alarm's OPC UA EventId (``bytes.fromhex`` gives it back)."""

    id: int
    time: datetime
    machine: str
    alarm_id: str
    kind: str
    state: str
    active: bool | None
    acked: bool | None
    confirmed: bool | None
    enabled: bool | None
    shelving: str | None
    severity: int
    message: str
    comment: str
    user: str
    value: float | None
    batch_id: str | None
    recipe_id: str | None
    event_id: str

    @property
    def time_s(self) -> float:
        """``time`` in seconds since the epoch."""
        return self.time.timestamp()

    def as_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (``time`` as ISO 8601 UTC text)."""
        return {name: (_utc_text_us(self.time_s) if name == "time" else getattr(self, name))
                for name in self.__dataclass_fields__}


def _plain(value: object) -> object:
    """An enum's value (AlarmState, Shelving, Priority), anything else as it is."""
    return getattr(value, "value", value)


def _optional_float(value: object) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def journal_values(event, machine: str = "") -> dict[str, Any] | None:
    """The ``alarm_journal`` row of one ``plc.commands.Event`` (None if its kind is not in
    JOURNAL_KINDS). Event data keys used: alarm_id, transition, to, priority, user, comment,
    value, batch_id, recipe_id, alarm (the ``plc.alarms.Alarm`` after the change: its active,
    acked, confirmed, enabled, shelving, message, changed and event_id). Missing keys give
    NULL / "" / 0; the time is the alarm's ``changed`` (wall clock), else the event's."""
    if event.kind not in JOURNAL_KINDS:
        return None
    data = dict(event.data)
    alarm = data.get("alarm")
    system = event.kind == "alarm_system"

    def of_alarm(name: str, default: object = None) -> object:
        return _plain(getattr(alarm, name, default)) if alarm is not None else default

    flag = (lambda name: None if alarm is None or system else bool(of_alarm(name)))
    time_s = of_alarm("changed") or event.time_s
    event_id = of_alarm("event_id") or data.get("event_id") or b""
    if system:
        kind = str(data.get("transition") or "restart")
    else:
        kind = str(data.get("transition") or "")
    return {
        "time": _utc_text_us(float(time_s)),
        "machine": str(machine),
        "alarm_id": str(data.get("alarm_id") or of_alarm("id", "") or ""),
        "kind": kind,
        "state": str(_plain(data.get("to")) or _plain(of_alarm("state", "")) or ""),
        "active": flag("active"), "acked": flag("acked"), "confirmed": flag("confirmed"),
        "enabled": flag("enabled"),
        "shelving": None if alarm is None or system else str(of_alarm("shelving", "")),
        "severity": int(_plain(data.get("priority")) or of_alarm("priority", 0) or 0),
        "message": str(of_alarm("message", "") or event.message or ""),
        "comment": str(data.get("comment") or ""),
        "user_name": str(data.get("user") or ""),
        "value": _optional_float(data.get("value", of_alarm("value"))),
        "batch_id": _text(data.get("batch_id") or None),
        "recipe_id": _text(data.get("recipe_id") or None),
        "event_id": event_id.hex() if isinstance(event_id, (bytes, bytearray)) else str(event_id),
    }


def _journal_row(r: Mapping[str, Any]) -> JournalRow:
    return JournalRow(
        id=r["id"], time=datetime.fromisoformat(r["time"]), machine=r["machine"],
        alarm_id=r["alarm_id"], kind=r["kind"], state=r["state"], active=r["active"],
        acked=r["acked"], confirmed=r["confirmed"], enabled=r["enabled"], shelving=r["shelving"],
        severity=r["severity"], message=r["message"], comment=r["comment"], user=r["user_name"],
        value=r["value"], batch_id=r["batch_id"], recipe_id=r["recipe_id"], event_id=r["event_id"])


# --------------------------------------------------------------------------- schema check

_OPEN_LOCK = 0x7465_6D70_6572    # PostgreSQL advisory lock held while a Records opens ("temper")


def book_of(machine: str | None, recipe_library: str | None = None) -> str:
    """The recipe book a machine uses: ``library:<name>`` (``opcua.recipe_library``: shared by
    every machine naming it), else ``machine:<id>`` (its own); "" without either (the
    unclaimed recipes of an older database)."""
    if recipe_library:
        return f"library:{recipe_library}"
    return f"machine:{machine}" if machine else ""


def _seeded_key(book: str) -> str:
    """The meta key that marks ``book`` seeded ("recipes_seeded" for the unclaimed book, as
    before schema 6)."""
    return f"recipes_seeded:{book}" if book else "recipes_seeded"


def stored_schema(db) -> str | None:
    """The schema version in the ``meta`` table of the database on connection ``db``; None if
    it has none (a new database)."""
    if "meta" not in inspect(db).get_table_names():
        return None
    return db.scalar(select(meta.c.value).where(meta.c.key == "schema"))


def _newer(found: str) -> bool:
    return not found.isdigit() or int(found) > int(SCHEMA_VERSION)


def check_schema(url: str) -> None:
    """SchemaTooNew if the records at ``url`` were written by a newer program; nothing else
    (a database that does not exist yet, or cannot be reached now, is for ``Records`` to make
    or to report). Reads only: a SQLite file that is not there is not made."""
    from sqlalchemy.exc import SQLAlchemyError

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not (parsed.database and Path(parsed.database).is_file()):
        return
    engine = create_engine(parsed)
    try:
        with engine.connect() as db:
            found = stored_schema(db)
    except SQLAlchemyError:
        return
    finally:
        engine.dispose()
    if found is not None and _newer(found):
        raise SchemaTooNew(parsed.render_as_string(hide_password=True), found)


def _recipes_by_book(db, columns: list[str]) -> None:
    """Schema 5 -> 6 of the recipes table: ``book`` ("" in the old rows) in the primary key."""
    if db.dialect.name == "postgresql":
        db.exec_driver_sql("ALTER TABLE recipes ADD COLUMN book VARCHAR(128) NOT NULL DEFAULT ''")
        key = db.exec_driver_sql("SELECT conname FROM pg_constraint WHERE conrelid = 'recipes'::regclass "
                                 "AND contype = 'p'").scalar()
        if key is not None:
            db.exec_driver_sql(f'ALTER TABLE recipes DROP CONSTRAINT "{key}"')
        db.exec_driver_sql("ALTER TABLE recipes ADD PRIMARY KEY (book, id)")
        db.exec_driver_sql("ALTER TABLE meta ALTER COLUMN key TYPE VARCHAR(200)")
        return
    names = ", ".join(c for c in columns if c in recipes.c)
    db.exec_driver_sql("ALTER TABLE recipes RENAME TO recipes_v5")
    recipes.create(db)
    db.exec_driver_sql(f"INSERT INTO recipes (book, {names}) SELECT '', {names} FROM recipes_v5")
    db.exec_driver_sql("DROP TABLE recipes_v5")


# --------------------------------------------------------------------------- records


class Records:
    """Users, recipes, the audit trail, the alarm journal and the batch records in the database
    at ``url`` (an SQLAlchemy URL), as machine ``machine`` sees them.

    ``machine`` (the config's ``machine.id``): the audit rows written carry it, and the reads of
    the audit trail, the alarm journal and the batch records return that machine's rows only;
    None: every machine's rows (a plant's view, the backup), and audit rows written without a
    machine. The recipe book is ``book_of(machine, recipe_library)``. Users are the database's
    (plant-wide). Opening checks the schema (SchemaTooNew: written by a newer program, nothing
    touched), makes the missing tables, migrates an older schema, and gives the rows that have
    no machine yet to ``machine`` (``_claim``).

    Safe to share between threads (one engine, a connection per call)."""

    def __init__(self, url: str, machine: str | None = None, recipe_library: str | None = None):
        parsed = make_url(url)
        sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
        if sqlite_file:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.url = parsed.render_as_string(hide_password=True)
        self.machine = str(machine) if machine else None
        self.book = book_of(self.machine, recipe_library)
        self.engine: Engine = create_engine(parsed)
        try:
            with self.engine.begin() as db:
                if db.dialect.name == "postgresql":     # machines starting together: one at a time
                    db.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_OPEN_LOCK})")
                found = stored_schema(db)
                if found is not None and _newer(found):
                    raise SchemaTooNew(self.url, found)
                _metadata.create_all(db)
                if found is None:
                    db.execute(insert(meta).values(key="schema", value=SCHEMA_VERSION))
                elif found != SCHEMA_VERSION:
                    log.warning("records schema %s -> %s (%s)", found, SCHEMA_VERSION, self.url)
                self._migrate(db)
                if self.machine is not None:
                    self._claim(db)
        except BaseException:
            self.engine.dispose()
            raise
        if sqlite_file:
            os.chmod(parsed.database, 0o600)   # hashes only, but nobody else's business
        self._user_lock = threading.Lock()

    @staticmethod
    def _migrate(db) -> None:
        """Schema 1 -> 2: the audit table's four nullable columns (ALTER TABLE ... ADD COLUMN,
        the same on SQLite and PostgreSQL; old rows get NULL). Schema 2 -> 3: the alarm_journal
        table and its indexes (made by ``create_all``, which adds missing tables only). Schema 3 ->
        4: the batches table and its indexes (``create_all`` too), recipes.acceptance (NULL in the
        old rows: the default criteria). Schema 4 -> 5: users.must_change (NULL in the old rows:
        False). Schema 5 -> 6: audit.machine and its index (NULL in the old rows); recipes.book
        in the primary key (book, id) (PostgreSQL: the column added and the key made again;
        SQLite, which cannot change a key: the table made again and the rows copied), "" in the
        old rows (unclaimed); meta.key 200 characters long (``recipes_seeded:<book>``). The old
        rows are the first machine's to open the database after (``_claim``)."""
        have = {c["name"] for c in inspect(db).get_columns("audit")}
        for name in _AUDIT_SINCE_2:
            if name not in have:
                db.exec_driver_sql(f"ALTER TABLE audit ADD COLUMN {name} TEXT")
        if "machine" not in have:
            db.exec_driver_sql("ALTER TABLE audit ADD COLUMN machine TEXT")
            next(i for i in audit_log.indexes if i.name == "audit_machine").create(db, checkfirst=True)
        recipe_columns = [c["name"] for c in inspect(db).get_columns("recipes")]
        if "acceptance" not in recipe_columns:
            db.exec_driver_sql("ALTER TABLE recipes ADD COLUMN acceptance TEXT")
            recipe_columns.append("acceptance")
        if "book" not in recipe_columns:
            _recipes_by_book(db, recipe_columns)
        if "must_change" not in {c["name"] for c in inspect(db).get_columns("users")}:
            db.exec_driver_sql("ALTER TABLE users ADD COLUMN must_change BOOLEAN")
        db.execute(update(meta).where(meta.c.key == "schema").values(value=SCHEMA_VERSION))

    def _claim(self, db) -> None:
        """Give this machine the rows that have none: audit rows with no machine (written before
        schema 6, or restored from an older backup) and the unclaimed recipes (book "") whose id
        its book does not have, with the mark that they were seeded. So a machine's own database
        keeps its history across the upgrade; in a shared one, the first machine to start after
        the upgrade takes them (the database was that machine's before it was shared)."""
        db.execute(update(audit_log).where(audit_log.c.machine.is_(None)).values(machine=self.machine))
        mine = select(recipes.c.id).where(recipes.c.book == self.book).scalar_subquery()
        db.execute(update(recipes).where(recipes.c.book == "", recipes.c.id.not_in(mine))
                   .values(book=self.book))
        seeded = db.scalar(select(meta.c.value).where(meta.c.key == "recipes_seeded"))
        if seeded is not None:
            db.execute(delete(meta).where(meta.c.key == "recipes_seeded"))
            if db.scalar(select(meta.c.value).where(meta.c.key == _seeded_key(self.book))) is None:
                db.execute(insert(meta).values(key=_seeded_key(self.book), value=seeded))

    def __repr__(self) -> str:
        return f"Records({self.url!r})"

    def close(self) -> None:
        self.engine.dispose()

    # ----------------------------------------------------------------------- users

    def add_user(self, name: str, password: str, role: str) -> None:
        _check_name(name), _check_role(role), _check_password(password)
        hashed = hash_password(password)
        with self.engine.begin() as db:
            if db.scalar(select(users.c.name).where(users.c.name == name)) is not None:
                raise UserExists(name)
            db.execute(insert(users).values(name=name, role=role, password_hash=hashed, must_change=False))

    def import_users(self, rows: Iterable[ImportedUser]) -> int:
        """Add the users of ``rows`` (ImportedUser: a hash of ours, never a password) in one
        transaction: all of them, or none. InvalidUser for a bad name, role or hash or a name
        twice in ``rows``, UserExists for a name in the records already; nothing written then.
        Returns the number added."""
        values, seen = [], set()
        for row in rows:
            name, role, password_hash, must_change = row
            _check_name(name), _check_role(role), _check_hash(password_hash)
            if name in seen:
                raise InvalidUser("name", f"{name!r} is given twice")
            seen.add(name)
            values.append({"name": name, "role": role, "password_hash": password_hash,
                           "must_change": bool(must_change)})
        if not values:
            return 0
        with self._user_lock, self.engine.begin() as db:
            present = db.scalars(select(users.c.name).where(users.c.name.in_(seen))).first()
            if present is not None:
                raise UserExists(present)
            db.execute(insert(users), values)
        return len(values)

    def set_password(self, name: str, password: str) -> None:
        """An admin's change of a user's password (``tempering users passwd``): no old one
        asked; clears must_change."""
        _check_password(password)
        hashed = hash_password(password)
        with self.engine.begin() as db:
            if db.execute(update(users).where(users.c.name == name)
                          .values(password_hash=hashed, must_change=False)).rowcount != 1:
                raise NoSuchUser(name)

    def change_password(self, name: str, old: str, new: str) -> None:
        """A user's own change of password (OPC UA Part 18 §5.2.8 ChangePassword): ``old`` must
        be the user's password now and ``new`` keep the rules and differ from it; then the
        scrypt hash of ``new`` is stored and must_change cleared. InvalidUser (the rules;
        checked first, no scrypt), NoSuchUser, WrongPassword (also if the password was changed
        meanwhile), SamePassword; nothing changed then. Two derivations: the check, the new
        hash."""
        _check_password(new)
        with self.engine.connect() as db:
            stored = db.scalar(select(users.c.password_hash).where(users.c.name == name))
        if stored is None:
            verify_password("", _dummy_hash())
            raise NoSuchUser(name)
        if not isinstance(old, str) or len(old) > MAX_PASSWORD_LENGTH or not verify_password(old, stored):
            raise WrongPassword(name)
        if new == old:
            raise SamePassword()
        hashed = hash_password(new)
        with self.engine.begin() as db:      # only if it is still the hash just verified
            if db.execute(update(users).where(users.c.name == name, users.c.password_hash == stored)
                          .values(password_hash=hashed, must_change=False)).rowcount != 1:
                raise WrongPassword(name)

    def must_change(self, name: str) -> bool:
        """Whether the user must set a new password before doing anything but read (NoSuchUser
        for an unknown user)."""
        with self.engine.connect() as db:
            row = db.execute(select(users.c.must_change).where(users.c.name == name)).first()
        if row is None:
            raise NoSuchUser(name)
        return bool(row.must_change)

    def must_change_users(self) -> set[str]:
        """The names of the users who must set a new password."""
        with self.engine.connect() as db:
            return set(db.scalars(select(users.c.name).where(users.c.must_change.is_(True))))

    def set_role(self, name: str, role: str) -> None:
        _check_role(role)
        with self._user_lock, self.engine.begin() as db:
            current = db.scalar(select(users.c.role).where(users.c.name == name))
            if current is None:
                raise NoSuchUser(name)
            if current == "admin" and role != "admin":
                self._keep_an_admin(db, name)
            db.execute(update(users).where(users.c.name == name).values(role=role))

    def delete_user(self, name: str) -> None:
        with self._user_lock, self.engine.begin() as db:
            current = db.scalar(select(users.c.role).where(users.c.name == name))
            if current is None:
                raise NoSuchUser(name)
            if current == "admin":
                self._keep_an_admin(db, name)
            db.execute(delete(users).where(users.c.name == name))

    @staticmethod
    def _keep_an_admin(db, name: str) -> None:
        admins = db.scalar(select(func.count()).select_from(users).where(users.c.role == "admin"))
        if admins <= 1:
            raise LastAdmin(name)

    def list_users(self) -> list[tuple[str, str]]:
        """(name, role) of every user, by name."""
        with self.engine.connect() as db:
            return [(r.name, r.role) for r in db.execute(select(users.c.name, users.c.role)
                                                         .order_by(users.c.name))]

    def role_of(self, name: str) -> str | None:
        """The user's role now (None: no such user); no password involved."""
        with self.engine.connect() as db:
            return db.scalar(select(users.c.role).where(users.c.name == name))

    def check_password(self, name: str, password: str) -> str | None:
        """The user's role if ``password`` is theirs, else None (also for an unknown user, after
        the same scrypt work). Never raises for bad input. A right password whose hash was made
        with other cost parameters than SCRYPT_COST is hashed again with SCRYPT_COST and stored
        (unless the password was changed meanwhile): one more derivation, on that login only.
        So is a right password of an imported ``aspnet$`` hash, whose check costs the scrypt
        work too (on top of its PBKDF2), so that the time does not tell such a user either."""
        if not isinstance(name, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
            verify_password("", _dummy_hash())
            return None
        with self.engine.connect() as db:
            row = db.execute(select(users.c.role, users.c.password_hash)
                             .where(users.c.name == name)).first()
        if row is None or row.password_hash.startswith(ASPNET_PREFIX):
            verify_password(password, _dummy_hash())    # PBKDF2 alone would tell a legacy user by time
        if row is None:
            return None
        if not verify_password(password, row.password_hash):
            return None
        if hash_cost(row.password_hash) != SCRYPT_COST:
            self._rehash(name, password, row.password_hash)
        return row.role

    def _rehash(self, name: str, password: str, old_hash: str) -> None:
        new_hash = hash_password(password)
        with self.engine.begin() as db:      # only if it is still the hash just verified
            db.execute(update(users).where(users.c.name == name, users.c.password_hash == old_hash)
                       .values(password_hash=new_hash))

    # ----------------------------------------------------------------------- recipes

    def load_recipes(self) -> dict[str, dict[str, Any]]:
        """Every recipe of the book (``self.book``), id -> fields, each validated again through
        ``plc.config.Recipe`` (InvalidRecipe if a row was changed behind our back into something
        invalid)."""
        with self.engine.connect() as db:
            rows = db.execute(select(recipes).where(recipes.c.book == self.book)
                              .order_by(recipes.c.id)).mappings().all()
        out = {}
        for row in rows:
            fields = {k: (json.loads(row[k]) if k in _RECIPE_JSON else row[k])
                      for k in RECIPE_FIELDS if row[k] is not None or k not in _RECIPE_JSON}
            out[row["id"]] = validate_recipe(row["id"], fields)
        return out

    def save_recipe(self, recipe_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Insert or replace the recipe in the book; returns the validated fields (InvalidRecipe:
        nothing written)."""
        values = validate_recipe(recipe_id, fields)
        this = (recipes.c.book == self.book) & (recipes.c.id == recipe_id)
        with self.engine.begin() as db:
            if db.scalar(select(recipes.c.id).where(this)) is not None:
                db.execute(update(recipes).where(this).values(**_recipe_row(values)))
            else:
                db.execute(insert(recipes).values(book=self.book, id=recipe_id, **_recipe_row(values)))
        return values

    def delete_recipe(self, recipe_id: str) -> None:
        with self.engine.begin() as db:
            if db.execute(delete(recipes).where(recipes.c.book == self.book,
                                                recipes.c.id == recipe_id)).rowcount != 1:
                raise NoSuchRecipe(recipe_id)

    def seed_recipes(self, book: RecipeBook) -> int:
        """On the book's first use only: copy the recipes file's recipes in; the number copied
        (0 on every later start, even if all recipes were deleted since: the database is the
        source of truth from then on). A library is seeded by the first machine naming it."""
        key = _seeded_key(self.book)
        with self.engine.begin() as db:
            if db.dialect.name == "postgresql":     # two machines seeding one library: one does
                db.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_OPEN_LOCK})")
            if db.scalar(select(meta.c.value).where(meta.c.key == key)) is not None:
                return 0
            have = set(db.scalars(select(recipes.c.id).where(recipes.c.book == self.book)))
            new = {rid: r.model_dump() for rid, r in book.recipes.items() if rid not in have}
            if new:
                db.execute(insert(recipes), [{"book": self.book, "id": rid, **_recipe_row(fields)}
                                             for rid, fields in new.items()])
            db.execute(insert(meta).values(key=key, value=_utc_text(time.time())))
        return len(new)

    # ----------------------------------------------------------------------- audit trail

    def audit(self, user: str, action: str, target: str, old: object, new: object, result: str,
              time_s: float, *, command_id: str = "", origin: str = "", peer: str = "",
              certificate: str = "") -> None:
        """Record one action: ``time_s`` in seconds since the epoch (UTC); ``action`` "write",
        "call" or "login"; ``target`` the node or method; ``old``/``new`` stored as text (None
        stays NULL); ``result`` the StatusCode's name ("Good", "BadUserAccessDenied: ...").
        Optional, NULL when empty: ``command_id`` (the PLC command an accepted write or call
        became), ``origin`` (where it came from), ``peer`` (the client's ``host:port``),
        ``certificate`` (the client certificate's thumbprint). The row's machine is
        ``self.machine``."""
        with self.engine.begin() as db:
            db.execute(insert(audit_log).values(
                time=_utc_text(time_s), user_name=str(user), action=str(action), target=str(target),
                old_value=_text(old), new_value=_text(new), result=str(result),
                command_id=str(command_id) or None, origin=str(origin) or None, peer=str(peer) or None,
                certificate=str(certificate) or None, machine=self.machine))

    def audit_entries(self, limit: int = 100) -> list[dict[str, str | None]]:
        """The machine's newest ``limit`` entries (every machine's without one), newest first:
        dicts with time, user, action, target, old, new, result, command_id, origin, peer,
        certificate, machine (None where not given)."""
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if self.machine is not None:
            query = query.where(audit_log.c.machine == self.machine)
        with self.engine.connect() as db:
            rows = db.execute(query).mappings()
            return [{"time": r["time"], "user": r["user_name"], "action": r["action"],
                     "target": r["target"], "old": r["old_value"], "new": r["new_value"],
                     "result": r["result"], **{k: r[k] for k in _AUDIT_SINCE_2},
                     "machine": r["machine"]} for r in rows]

    # ----------------------------------------------------------------------- alarm journal

    def journal_alarms(self, events: Iterable, machine: str = "") -> int:
        """Store the "alarm" and "alarm_system" events among ``events`` (``plc.commands.Event``;
        other kinds are skipped) as journal rows of ``machine`` (default: ``self.machine``), in
        one transaction. An event
        stored before (the same machine, alarm, kind, time and EventId) is skipped, also within
        ``events``: handing the same events in again changes nothing. Returns the number of
        rows added."""
        rows, seen = [], set()
        machine = machine or self.machine or ""
        for e in events:
            values = journal_values(e, machine)
            if values is None:
                continue
            key = (values["alarm_id"], values["kind"], values["time"], values["event_id"])
            if key not in seen:
                seen.add(key)
                rows.append(values)
        if not rows:
            return 0
        dialect = self.engine.dialect.name
        with self.engine.begin() as db:
            if dialect in ("sqlite", "postgresql"):       # insert-if-absent, one statement
                stmt = (sqlite if dialect == "sqlite" else postgresql).insert(alarm_journal)
                stmt = stmt.on_conflict_do_nothing().returning(alarm_journal.c.id)
                return len(db.execute(stmt, rows).all())    # the ids of the rows added
            added = 0
            for values in rows:                           # any other database: look first
                c = alarm_journal.c
                if db.scalar(select(c.id).where(c.machine == values["machine"],
                                                c.alarm_id == values["alarm_id"],
                                                c.kind == values["kind"], c.time == values["time"],
                                                c.event_id == values["event_id"])) is None:
                    db.execute(insert(alarm_journal).values(**values))
                    added += 1
            return added

    def alarm_journal(self, since: datetime | float | None = None, until: datetime | float | None = None,
                      alarm_id: str | None = None, batch_id: str | None = None,
                      limit: int | None = None, *, newest: bool = False) -> list[JournalRow]:
        """Journal rows with ``since <= time < until`` (datetimes, naive ones taken as UTC, or
        seconds since the epoch; None: no bound), of one alarm and/or one batch if given,
        ordered by time, then by id (the order they were stored in). ``limit``: at most that
        many, the first ones in that order, or with ``newest=True`` the last ones (still
        returned oldest first). The machine's rows only (every machine's without one).
        ValueError for a negative limit."""
        c = alarm_journal.c
        query = select(alarm_journal)
        if self.machine is not None:
            query = query.where(c.machine == self.machine)
        if since is not None:
            query = query.where(c.time >= _utc_text_us(_epoch_s(since)))
        if until is not None:
            query = query.where(c.time < _utc_text_us(_epoch_s(until)))
        if alarm_id is not None:
            query = query.where(c.alarm_id == alarm_id)
        if batch_id is not None:
            query = query.where(c.batch_id == batch_id)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
            query = query.limit(limit)
        query = query.order_by(c.time.desc(), c.id.desc()) if newest else query.order_by(c.time, c.id)
        with self.engine.connect() as db:
            rows = [_journal_row(r) for r in db.execute(query).mappings()]
        return rows[::-1] if newest else rows

    # ----------------------------------------------------------------------- batch records

    def save_batch(self, record: BatchRecord) -> None:
        """Store ``record`` (an ``opcua_server.batches.BatchRecord``), replacing a stored record
        of the same batch_id, in one transaction."""
        values = _batch_values(record)
        with self.engine.begin() as db:
            db.execute(delete(batches).where(batches.c.batch_id == values["batch_id"]))
            db.execute(insert(batches).values(**values))

    def batch(self, batch_id: str) -> BatchRecord | None:
        """The stored record of ``batch_id`` (``BatchRecord.from_dict`` of its JSON), None if
        there is none (or it is another machine's)."""
        query = select(batches.c.record).where(batches.c.batch_id == batch_id)
        if self.machine is not None:
            query = query.where(batches.c.machine == self.machine)
        with self.engine.connect() as db:
            text = db.scalar(query)
        return None if text is None else BatchRecord.from_dict(json.loads(text))

    def batches(self, since: datetime | float | None = None, until: datetime | float | None = None,
                verdict: str | None = None, limit: int | None = None) -> list[BatchSummary]:
        """Summaries of the batches that started at ``since <= started_at < until`` (datetimes,
        naive ones taken as UTC, or seconds since the epoch; None: no bound), with ``verdict``
        if given, oldest first; ``limit``: the newest that many (still oldest first). Reads the
        summary columns only (indexed on started_at and on verdict), never a record's JSON.
        The machine's batches only (every machine's without one). ValueError for an unknown
        verdict or a negative limit."""
        c = batches.c
        query = select(c.batch_id, c.machine, c.recipe_id, c.started_at, c.ended_at, c.outcome,
                       c.verdict, c.reasons)
        if self.machine is not None:
            query = query.where(c.machine == self.machine)
        if since is not None:
            query = query.where(c.started_at >= _epoch_s(since))
        if until is not None:
            query = query.where(c.started_at < _epoch_s(until))
        if verdict is not None:
            if verdict not in VERDICTS:
                raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
            query = query.where(c.verdict == verdict)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
            query = query.limit(limit)
        query = query.order_by(c.started_at.desc(), c.batch_id.desc())
        with self.engine.connect() as db:
            rows = [BatchSummary(r.batch_id, r.machine, r.recipe_id, r.started_at, r.ended_at,
                                 r.outcome, r.verdict, tuple(json.loads(r.reasons)))
                    for r in db.execute(query)]
        return rows[::-1]

    def next_batch_seq(self, machine: str | None = None) -> int:
        """The machine's highest batch number in the records + 1 (1 if it has none): the PLC
        numbers its next batch at least this (``plc.runtime.Controller.set_batch_floor`` of this
        minus one). ``machine``: default ``self.machine``."""
        machine = machine or self.machine
        with self.engine.connect() as db:
            top = db.scalar(select(func.max(batches.c.seq)).where(batches.c.machine == machine))
        return (top or 0) + 1


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """One batch as ``Records.batches`` lists it: its summary columns (times in seconds since
    the epoch; reasons: the failed criteria's texts, or why the batch is incomplete)."""

    batch_id: str
    machine: str
    recipe_id: str
    started_at: float
    ended_at: float
    outcome: str
    verdict: str
    reasons: tuple[str, ...]

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at

    def as_dict(self) -> dict[str, Any]:
        """Every field and the duration, JSON-ready (the times as ISO 8601 UTC text)."""
        return {"batch_id": self.batch_id, "machine": self.machine, "recipe_id": self.recipe_id,
                "started_at": _utc_text(self.started_at), "ended_at": _utc_text(self.ended_at),
                "duration_s": self.duration_s, "outcome": self.outcome, "verdict": self.verdict,
                "reasons": list(self.reasons)}


def batch_seq_of(batch_id: str, machine: str) -> int | None:
    """The number of a batch id ``<machine>-NNNNNN`` (``plc.sequencer``'s form), else None."""
    prefix, sep, number = batch_id.rpartition("-")
    return int(number) if sep and prefix == machine and number.isdigit() else None


def _batch_values(record: BatchRecord) -> dict[str, Any]:
    if record.verdict not in VERDICTS:
        raise ValueError(f"batch {record.batch_id}: verdict must be one of {', '.join(VERDICTS)}, "
                         f"got {record.verdict!r}")
    return {"batch_id": record.batch_id, "machine": record.machine_id,
            "seq": batch_seq_of(record.batch_id, record.machine_id), "recipe_id": record.recipe_id,
            "started_at": float(record.started_at), "ended_at": float(record.ended_at),
            "outcome": record.outcome, "verdict": record.verdict,
            "reasons": json.dumps(list(record.reasons), ensure_ascii=False),
            "record": json.dumps(record.to_dict(), ensure_ascii=False, sort_keys=True)}
