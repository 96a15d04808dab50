"""Security of the OPC UA server: roles, certificates (PKI), users, and the wiring into asyncua.

One job: nobody reads, writes or calls anything without being who they say (OPC UA Part 2 §4,
Part 4 §5.6). By default the server offers only signed and encrypted endpoints
(Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss; Sign and SignAndEncrypt), every
session needs a user name and password from the records, and every client's application
certificate must be in ``pki/trusted`` (an untrusted one is refused with
BadCertificateUntrusted and copied to ``pki/rejected`` for an admin to trust with
``tempering pki trust``). Anonymous sessions (role viewer) and the unencrypted None endpoint
(loopback endpoints only) are opt-in settings of the ``opcua:`` section.

Layers, from the bottom:
- ROLES / role_allows: viewer < operator < technician < admin, each with the rights of the ones
  before it. The server checks ``role_allows(user.tempering_role, needed)`` on every writable
  node and method.
- Pki: ``<dir>/own`` (the server's certificate ``cert.der`` and key ``key.pem``, made on first
  start), ``<dir>/trusted`` and ``<dir>/rejected`` (client certificates, DER, named
  ``<common name>_<thumbprint>.der``; PEM files dropped into trusted/ count too). Thumbprints are
  the SHA-1 of the DER, in hex, as OPC UA uses them (Part 4 §7.37); a unique prefix will do.
- TemperingUserManager: asyncua's user manager interface. A wrong password, an unknown user, an
  anonymous session (unless allowed), a session on a channel without a trusted client
  certificate, a user name, certificate or client host locked out after failed logins
  (limits.LoginLimiter): None, which asyncua answers with BadUserAccessDenied (an identity
  token type we do not offer is refused earlier with BadIdentityTokenRejected). The password
  check (scrypt, ~0.5 s) runs in a worker thread, after the limiter's delay (asyncio.sleep),
  decided by a hook around asyncua's ActivateSession before asyncua asks ``get_user``
  synchronously; every login, accepted or refused, is in the audit trail with the client's
  ``host:port``, its certificate's thumbprint and the reason.
- Password changes (OPC UA Part 18 §5.2.8): a user whose records say must_change (a one-time
  or too short password from a legacy machine, ``records.legacy_password``) gets his session,
  answered Good_PasswordChangeRequired, with ``TemperingUser.must_change`` set
  (``password_change_pending``): he may read, browse, subscribe and call ChangePassword
  (``callable_before_change``) but nothing else; ``opcua_server.gate`` refuses every write and
  every other call with BadUserAccessDenied, "password change required", and records it; he sees
  only his own audit events. The standard method Server.ServerConfiguration.UserManagement.
  ChangePassword (i=24310; OldPassword, NewPassword) is bound to
  ``TemperingUserManager.change_password``: any user-name session, on an encrypted channel,
  for its own user (records.change_password, scrypt in a worker thread); a wrong old password
  counts as a failed login. The session has its role's rights from its next request; other
  sessions of the user log in again. Every call is in the audit trail (action "call"), never
  with a password.
- Audit events (Part 5 §6.4.7, §6.4.8): every ActivateSession, accepted or refused, is an
  AuditActivateSessionEventType on the Server object (SessionId, UserIdentityToken without its
  secret, SecureChannelId, Status, StatusCodeId, ClientUserId, ServerId, ClientAuditEntryId,
  ActionTimeStamp; Message: who, from where, why refused); a CreateSession refused for its
  certificate is an AuditCreateSessionEventType with Status False. ``sees_audit`` says who gets
  audit events: users with the admin role (Part 2 §4.10: the audit trail is for those who
  administer security) every one of them; any other user only those of his own actions.
- TemperingRuleset: asyncua's per-request permission check. Viewers may only read, browse and
  subscribe; nobody may add or delete nodes or references over the network. It also makes the
  session's user known to handlers through ``current_user()`` (see there).
- configure_security(server, settings, records, pki): all of the above, and the server limits
  of ``limits.apply_limits``, on an asyncua Server, after ``server.init()`` and before
  ``server.start()``.

asyncua 2.1 internals used (checked by the tests against a real asyncua server and client):
``UaProcessor._process_message`` (wrapped once per process; only servers whose InternalServer
has a ``tempering_logins`` manager are affected), its ``name`` (the peer), ``session``,
``_connection.security_policy`` (its ``Mode`` too), ``send_response`` (an ActivateSession
answer's ServiceResult), ``InternalServer.decrypt_user_token`` and ``lookup_external_session``.

Errors: PkiError(Exception) > NoSuchCertificate(PkiError, KeyError), AmbiguousCertificate,
BadCertificateFile (a file that is not a certificate). Refusals towards clients are asyncua
ServiceErrors with the StatusCode (BadCertificateUntrusted, BadCertificateTimeInvalid,
BadCertificateUriInvalid) or a None user (BadUserAccessDenied); ChangePassword answers with
the codes of Part 18 §5.2.8 (BadIdentityTokenInvalid, BadOutOfRange, BadAlreadyExists,
BadInvalidState, BadSecurityModeInsufficient) or BadUserAccessDenied (locked out).
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import ADMIN_TYPES, USER_TYPES, PermissionRuleset, User, UserRole
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.internal_session import SessionState
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import struct_from_binary

from .limits import Key, LoginLimiter, apply_limits
from .notifiers import SERVER, new_event, notify
from .records import ROLES, InvalidUser, NoSuchUser, SamePassword, WrongPassword

log = logging.getLogger(__name__)

__all__ = ["ROLES", "AUDIT_ROLE", "sees_audit", "role_allows", "Pki", "CertificateEntry", "PkiError",
           "NoSuchCertificate", "AmbiguousCertificate", "BadCertificateFile", "TemperingUser",
           "TemperingUserManager", "LoginAttempt", "TemperingRuleset", "current_user", "current_session_id", "configure_security",
           "thumbprint", "CHANGE_PASSWORD", "PASSWORD_CHANGE_REQUIRED", "password_change_pending",
           "callable_before_change"]


AUDIT_ROLE = "admin"      # the least role that receives every audit event

#: UserManagement.ChangePassword (OPC UA Part 18 §5.2.8), in asyncua's standard address space.
CHANGE_PASSWORD = ua.NodeId(ua.ObjectIds.UserManagement_ChangePassword)
#: The reason given for whatever a session refuses until its user has set a new password.
PASSWORD_CHANGE_REQUIRED = "password change required"
#: What a session may call before: ChangePassword, and the refresh of the alarms it subscribed to
#: (Part 9 §5.5.7; changes nothing).
_CALLABLE_BEFORE_CHANGE = frozenset({CHANGE_PASSWORD, ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
                                     ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh2)})


def password_change_pending(user: Any) -> bool:
    """True while the session of ``user`` (a TemperingUser) must set a new password first: it
    may read, browse, subscribe and call ``callable_before_change`` methods only."""
    return bool(getattr(user, "must_change", False))


def callable_before_change(method_id: ua.NodeId) -> bool:
    """Whether a session whose password change is pending may call this method."""
    return method_id in _CALLABLE_BEFORE_CHANGE


def sees_audit(user: Any, actor: str | None = None) -> bool:
    """Whether a session of ``user`` (a TemperingUser) may receive an audit event of an action
    by ``actor`` (a user name; None: not a user's action, e.g. a login): an admin sees all, a
    user the events of his own actions (so does an admin whose password change is pending).
    Other users (asyncua's own, anonymous) see none."""
    role = getattr(user, "tempering_role", None)
    if role_allows(role, AUDIT_ROLE) and not password_change_pending(user):
        return True
    name = getattr(user, "name", None)
    return actor is not None and name is not None and name == actor


def role_allows(role: str | None, needed: str) -> bool:
    """True if ``role`` has the rights of ``needed`` (ROLES order); False for unknown roles."""
    if role not in ROLES or needed not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


# --------------------------------------------------------------------------- PKI

OWN_VALIDITY_DAYS = 5 * 365 + 1       # five years (one leap day)
MAX_REJECTED = 256                    # rejected/ stops growing here (a flood of made-up certificates)
_CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")


class PkiError(Exception):
    """A refused certificate-store operation (nothing changed)."""


class NoSuchCertificate(PkiError, KeyError):
    def __str__(self) -> str:
        return f"no certificate matches {self.args[0]!r} (see `tempering pki list`)"


class AmbiguousCertificate(PkiError):
    pass


class BadCertificateFile(PkiError):
    pass


class CertificateEntry(NamedTuple):
    state: str          # "own", "trusted" or "rejected"
    subject: str        # RFC 4514 string of the subject
    thumbprint: str     # SHA-1 of the DER, lower-case hex
    path: Path


def thumbprint(cert: x509.Certificate | bytes) -> str:
    """The OPC UA thumbprint: SHA-1 of the DER encoding, lower-case hex."""
    der = cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der).hexdigest()


def _load_cert(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "certificate"


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Pki:
    """The server's certificate store under ``directory``: own/, trusted/, rejected/."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.own_dir = self.directory / "own"
        self.trusted_dir = self.directory / "trusted"
        self.rejected_dir = self.directory / "rejected"
        for d in (self.directory, self.own_dir, self.trusted_dir, self.rejected_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cert_path = self.own_dir / "cert.der"
        self.key_path = self.own_dir / "key.pem"

    # ----------------------------------------------------------------------- own certificate

    def ensure_own_certificate(self, app_uri: str, hostname: str,
                               extra_hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """The server's certificate and key, made on first start (RSA 2048, SHA-256, five
        years, subjectAltName: ``app_uri``, ``hostname`` and ``extra_hosts`` as DNS names or IP
        addresses). Made again if missing, expired, for another application URI, or not the
        key's."""
        if self._own_is_usable(app_uri):
            return self.cert_path, self.key_path
        key = cert_gen.generate_private_key()
        alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(app_uri)]
        for host in dict.fromkeys((hostname, *extra_hosts)):
            if not host:
                continue
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        cert = cert_gen.generate_self_signed_app_certificate(
            key, f"Tempering OPC UA server@{hostname}", {"organizationName": "open-tempering"}, alt,
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=OWN_VALIDITY_DAYS)
        _write_atomic(self.key_path, cert_gen.dump_private_key_as_pem(key), mode=0o600)
        _write_atomic(self.cert_path, _der(cert))
        log.warning("made the server's certificate %s (thumbprint %s) for %s", self.cert_path,
                    thumbprint(cert), app_uri)
        return self.cert_path, self.key_path

    def _own_is_usable(self, app_uri: str) -> bool:
        try:
            cert = _load_cert(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except (OSError, ValueError):
            return False
        if cert.not_valid_after_utc <= datetime.datetime.now(datetime.timezone.utc):
            return False
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        if app_uri not in san.get_values_for_type(x509.UniformResourceIdentifier):
            return False
        return cert.public_key().public_numbers() == key.public_key().public_numbers()

    # ----------------------------------------------------------------------- the lists

    def _entries(self, state: str, directory: Path) -> list[CertificateEntry]:
        out = []
        for path in sorted(directory.iterdir()):
            if not path.is_file() or path.suffix.lower() not in _CERT_SUFFIXES or path == self.key_path:
                continue
            try:
                cert = _load_cert(path.read_bytes())
            except (OSError, ValueError):
                log.warning("%s: not a certificate; ignored", path)
                continue
            out.append(CertificateEntry(state, cert.subject.rfc4514_string(), thumbprint(cert), path))
        return out

    def list(self) -> list[CertificateEntry]:
        """The server's own certificate, then the trusted and the rejected ones."""
        own = self._entries("own", self.own_dir)
        return (own + self._entries("trusted", self.trusted_dir)
                + self._entries("rejected", self.rejected_dir))

    def _find(self, ident: str, states: tuple[str, ...]) -> CertificateEntry:
        key = ident.strip().lower().replace(":", "")
        if len(key) < 6:
            raise PkiError(f"{ident!r}: give at least 6 characters of the thumbprint (see "
                           "`tempering pki list`)")
        found = [e for e in self.list() if e.state in states and e.thumbprint.startswith(key)]
        if len({e.thumbprint for e in found}) > 1:
            raise AmbiguousCertificate(f"{ident!r} matches {len(found)} certificates; give more of "
                                       "the thumbprint")
        if not found:
            raise NoSuchCertificate(ident)
        return found[0]

    def _file_name(self, cert: x509.Certificate) -> str:
        cn = re.sub(r"[^A-Za-z0-9._-]+", "-", _common_name(cert)).strip("-.")[:40] or "certificate"
        return f"{cn}_{thumbprint(cert)}.der"

    def _from_file(self, path: Path) -> x509.Certificate:
        try:
            return _load_cert(path.read_bytes())
        except ValueError:
            raise BadCertificateFile(f"{path}: not an X.509 certificate (DER or PEM)") from None

    def trust(self, thumbprint_or_file: str | Path) -> CertificateEntry:
        """Trust a rejected certificate (by thumbprint or a unique prefix of it) or a
        certificate file (DER or PEM, copied in). Idempotent for a trusted one."""
        path = Path(thumbprint_or_file)
        if path.is_file():
            cert = self._from_file(path)
        else:
            entry = self._find(str(thumbprint_or_file), ("rejected", "trusted"))
            if entry.state == "trusted":
                return entry
            cert = _load_cert(entry.path.read_bytes())
        return self._move(cert, self.trusted_dir, self.rejected_dir, "trusted")

    def reject(self, thumbprint_or_file: str | Path) -> CertificateEntry:
        """Stop trusting a certificate: moved from trusted/ to rejected/ (or a file's
        certificate put in rejected/)."""
        path = Path(thumbprint_or_file)
        if path.is_file():
            cert = self._from_file(path)
        else:
            entry = self._find(str(thumbprint_or_file), ("trusted", "rejected"))
            if entry.state == "rejected":
                return entry
            cert = _load_cert(entry.path.read_bytes())
        return self._move(cert, self.rejected_dir, self.trusted_dir, "rejected")

    def _move(self, cert: x509.Certificate, to: Path, away: Path, state: str) -> CertificateEntry:
        tp = thumbprint(cert)
        target = to / self._file_name(cert)
        _write_atomic(target, _der(cert))
        for e in self._entries("", away):
            if e.thumbprint == tp:
                e.path.unlink()
        for e in self._entries("", to):          # another file of the same certificate
            if e.thumbprint == tp and e.path != target:
                e.path.unlink()
        return CertificateEntry(state, cert.subject.rfc4514_string(), tp, target)

    # ----------------------------------------------------------------------- client certificates

    def is_trusted(self, cert: x509.Certificate | bytes) -> bool:
        """True if this exact certificate is in trusted/ (read now: a `tempering pki trust`
        takes effect on the next connection, no restart)."""
        der = cert if isinstance(cert, bytes) else _der(cert)
        for path in self.trusted_dir.iterdir():
            if path.suffix.lower() in _CERT_SUFFIXES and path.is_file():
                try:
                    if _der(_load_cert(path.read_bytes())) == der:
                        return True
                except (OSError, ValueError):
                    continue
        return False

    def record_rejected(self, cert: x509.Certificate | bytes) -> Path | None:
        """Keep a copy of a refused client certificate in rejected/ (once per certificate; none
        beyond MAX_REJECTED files). The path, or None if not kept."""
        if isinstance(cert, bytes):
            try:
                cert = x509.load_der_x509_certificate(cert)
            except ValueError:
                return None
        target = self.rejected_dir / self._file_name(cert)
        if target.exists():
            return target
        if sum(1 for _ in self.rejected_dir.iterdir()) >= MAX_REJECTED:
            log.warning("rejected/ holds %d files: %s not kept", MAX_REJECTED, _common_name(cert))
            return None
        _write_atomic(target, _der(cert))
        return target

    async def validate_client(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """asyncua's certificate validator (Server.set_certificate_validator), called at
        CreateSession. In the order of Part 4 §6.1.3: trust list (BadCertificateUntrusted; the
        certificate is kept in rejected/), validity period (BadCertificateTimeInvalid), the
        client's ApplicationUri in the subjectAltName (BadCertificateUriInvalid)."""
        if not self.is_trusted(cert):
            kept = self.record_rejected(cert)
            log.warning("refused the untrusted client certificate %s (%s, thumbprint %s)%s",
                        cert.subject.rfc4514_string(), app.ApplicationUri, thumbprint(cert),
                        f"; kept as {kept}" if kept else "")
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        await _BASIC_CHECKS.validate(cert, app)


_BASIC_CHECKS = CertificateValidator(CertificateValidatorOptions.TIME_RANGE | CertificateValidatorOptions.URI)


# --------------------------------------------------------------------------- users and sessions


@dataclass
class TemperingUser(User):
    """A session's user: asyncua's ``role`` is UserRole.User for everyone (asyncua's own Admin
    role, which may change the address space, is never given); ours is ``tempering_role``.
    ``name`` is None for an anonymous session. ``must_change``: the user must set a new password
    before anything but reading (``password_change_pending``); cleared by ChangePassword."""

    tempering_role: str = "viewer"
    must_change: bool = False

    @property
    def label(self) -> str:
        """The name for the audit trail ("anonymous" for an anonymous session)."""
        return self.name or "anonymous"


class LoginAttempt(NamedTuple):
    """The answer to one login, decided before asyncua asks ``get_user``: ``user`` (None:
    refused, for ``reason``), for the name, password digest and channel certificate it was
    decided for."""

    name: str | None
    digest: bytes
    certificate: bytes
    user: TemperingUser | None
    reason: str = ""


#: The login being activated, set by the ActivateSession hook around asyncua's handling of it
#: (which calls get_user synchronously in the same task).
_attempt: contextvars.ContextVar[LoginAttempt | None] = contextvars.ContextVar(
    "tempering_opcua_login", default=None)

class TemperingUserManager:
    """asyncua user manager over the records (never asyncua's PermissiveUserManager, which
    lets anyone in and makes anyone named "admin" an admin), with rate-limited, audited logins
    whose password checks never run on the event loop.

    Refused (asyncua answers BadUserAccessDenied), in this order, each without a password
    check: a channel without a client certificate unless ``allow_unsecured`` (the None policy
    is allowed); a channel certificate that is not trusted (given ``pki``; the certificate
    given in CreateSession was checked already, this checks the one that signed the channel);
    an anonymous session unless ``allow_anonymous``; a user name, certificate or client host
    locked out by ``limiter`` (limits.LoginLimiter). Then, after the limiter's progressive
    delay (an asyncio.sleep), the password: records.check_password (scrypt, constant-time
    compare, ~0.5 s and 128 MiB) in a worker thread, at most ``parallel_checks`` at once (a
    burst of logins queues instead of taking every core and the memory), one at a time per
    user name; a wrong one counts against the user name, the certificate and the host.

    asyncua 2.1 calls ``get_user`` synchronously, on the event loop the scan shares, inside
    ActivateSession. ``configure_security`` therefore installs a hook around asyncua's
    handling of ActivateSession (``serve_activate_session``) that decides the login first,
    awaiting the slow parts; ``get_user`` then hands out that decision. Called without the hook
    (a test, another caller), ``get_user`` decides by itself, synchronously and without the
    delay. The hook also writes every login, accepted or refused, to the audit trail (action
    "login", user, peer ``host:port``, certificate thumbprint, result with the reason), and
    ``serve_create_session`` the sessions refused earlier (an untrusted certificate: user "-").

    A successful check is remembered for ``VERIFIED_TTL_S`` as an HMAC of name and password
    under a key that lives only in this process (never the password): the same user logging in
    again in that time costs a microsecond; a wrong password always pays the full scrypt.

    A user whose records say must_change gets a session whose TemperingUser has ``must_change``
    set, answered Good_PasswordChangeRequired, until he calls ``change_password`` (the
    UserManagement.ChangePassword method; see the module's "Password changes")."""

    VERIFIED_TTL_S = 60.0

    def __init__(self, records, *, pki: Pki | None = None, allow_anonymous: bool = False,
                 allow_unsecured: bool = False, limiter: LoginLimiter | None = None,
                 parallel_checks: int = 1, clock=time.monotonic, wall_clock=time.time):
        from .config import OpcUaSettings

        self._key = os.urandom(32)
        self.server_id = ""           # the server's ApplicationUri, for audit events (configure_security)
        self._verified: dict[str, tuple[bytes, float]] = {}
        self._clock = clock
        self._wall_clock = wall_clock
        self.records = records
        self.pki = pki
        self.allow_anonymous = allow_anonymous
        self.allow_unsecured = allow_unsecured
        self.limiter = limiter if limiter is not None else LoginLimiter.from_settings(OpcUaSettings())
        self._per_user: dict[str, list] = {}            # name -> [asyncio.Lock, users of it]
        self.parallel_checks = parallel_checks
        self._checks: asyncio.Semaphore | None = None   # made in the server's loop

    # ----------------------------------------------------------------------- the decision

    def _digest(self, username: str | None, password: str | None) -> bytes:
        return hmac.new(self._key, f"{username or ''}\0{password or ''}".encode("utf-8", "surrogatepass"),
                        "sha256").digest()

    def _attempt(self, username, password, certificate, user, reason="") -> LoginAttempt:
        return LoginAttempt(username, self._digest(username, password), bytes(certificate or b""),
                            user, reason)

    def _screen(self, username: str | None, certificate: bytes) -> tuple[TemperingUser | None, str] | None:
        """The checks without a password (blocking: reads pki/trusted). (None, reason): refused;
        (user, ""): an allowed anonymous session; None: go on to the password."""
        if not certificate:
            if not self.allow_unsecured:
                log.warning("refused a session on a channel without a client certificate")
                return None, "no client certificate"
        elif self.pki is not None and not self.pki.is_trusted(certificate):
            self.pki.record_rejected(certificate)
            log.warning("refused a session on a channel signed by an untrusted certificate")
            return None, "untrusted certificate"
        if not username:
            if self.allow_anonymous:
                return TemperingUser(role=UserRole.User, name=None, tempering_role="viewer"), ""
            log.warning("refused an anonymous session")
            return None, "anonymous not allowed"
        return None

    @staticmethod
    def _keys(username: str, certificate: bytes, peer: Any) -> list[Key]:
        keys: list[Key] = [("user", username)]
        if certificate:
            keys.append(("certificate", thumbprint(certificate)))
        if peer:
            keys.append(("peer", str(peer[0])))
        return keys

    def _locked(self, keys: list[Key]) -> str:
        now = self._clock()
        until = self.limiter.locked_until(keys, now)
        if until <= now:
            return ""
        log.warning("refused %s without a password check: locked out for %.0f s more",
                    ", ".join(f"{k}={v!r}" for k, v in keys if until == self.limiter.locked_until([(k, v)], now)),
                    until - now)
        return f"locked out ({until - now:.0f} s left)"

    def _password(self, username: str, password: str) -> tuple[str, bool] | None:
        """(role, must_change) of the user if the password is right (blocking: scrypt, or the
        database only if remembered)."""
        digest = self._digest(username, password)
        seen = self._verified.get(username)
        now = self._clock()
        if seen is not None and now < seen[1] and hmac.compare_digest(seen[0], digest):
            role = self.records.role_of(username)          # a role change applies at once
        else:
            role = self.records.check_password(username, password or "")
            if role is None:
                self._verified.pop(username, None)
            else:
                self._verified[username] = (digest, now + self.VERIFIED_TTL_S)
        try:
            return (role, self.records.must_change(username)) if role is not None else None
        except NoSuchUser:                                 # deleted meanwhile
            return None

    def _account(self, keys: list[Key], username: str, password: str | None, certificate: bytes,
                 found: tuple[str, bool] | None) -> LoginAttempt:
        now = self._clock()
        if found is None:
            until = self.limiter.failed(keys, now)
            log.warning("refused user %r: unknown user or wrong password%s", username,
                        f"; locked out for {until - now:.0f} s" if until > now else "")
            reason = "wrong password or unknown user" + (
                f"; now locked out ({until - now:.0f} s)" if until > now else "")
            return self._attempt(username, password, certificate, None, reason)
        role, must_change = found
        self.limiter.succeeded(("user", username), now)
        return self._attempt(username, password, certificate,
                             TemperingUser(role=UserRole.User, name=username, tempering_role=role,
                                           must_change=must_change))

    def check(self, username: str | None, password: str | None, certificate: Any = None,
              peer: Any = None) -> LoginAttempt:
        """Decide a login synchronously (blocking: scrypt; no delay): for callers without an
        event loop to keep free."""
        certificate = bytes(certificate or b"")
        screened = self._screen(username, certificate)
        if screened is not None:
            return self._attempt(username, password, certificate, *screened)
        keys = self._keys(username, certificate, peer)
        locked = self._locked(keys)
        if locked:
            return self._attempt(username, password, certificate, None, locked)
        return self._account(keys, username, password, certificate, self._password(username, password))

    async def check_async(self, username: str | None, password: str | None, certificate: Any = None,
                          peer: Any = None) -> LoginAttempt:
        """Decide a login without blocking the event loop: file and database reads and scrypt
        in worker threads, the limiter's delay as an asyncio.sleep."""
        certificate = bytes(certificate or b"")
        screened = await asyncio.to_thread(self._screen, username, certificate)
        if screened is not None:
            return self._attempt(username, password, certificate, *screened)
        keys = self._keys(username, certificate, peer)
        entry = self._per_user.setdefault(username, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:          # one check at a time per name: each sees the last one's failure
                locked = self._locked(keys)
                if locked:
                    return self._attempt(username, password, certificate, None, locked)
                delay = self.limiter.delay_s(keys, self._clock())
                if delay > 0:
                    await asyncio.sleep(delay)
                    locked = self._locked(keys)        # other names may have locked the certificate
                    if locked:
                        return self._attempt(username, password, certificate, None, locked)
                async with self._check_slot():
                    found = await asyncio.to_thread(self._password, username, password)
                return self._account(keys, username, password, certificate, found)
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._per_user[username]

    def _check_slot(self) -> asyncio.Semaphore:
        """One of the ``parallel_checks`` slots for scrypt work (made in the server's loop)."""
        if self._checks is None:
            self._checks = asyncio.Semaphore(self.parallel_checks)
        return self._checks

    def get_user(self, iserver: Any = None, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> TemperingUser | None:
        """asyncua's question at ActivateSession: the login decided by the hook for exactly
        these name, password and channel certificate; else decided now (blocking)."""
        attempt = _attempt.get()
        if (attempt is not None and attempt.name == username
                and attempt.certificate == bytes(certificate or b"")
                and hmac.compare_digest(attempt.digest, self._digest(username, password))):
            return attempt.user
        return self.check(username, password, certificate).user

    # ----------------------------------------------------------------------- the hooks

    async def _audit(self, user: str, peer: str, certificate: bytes, result: str, granted: str | None = None,
                     action: str = "login", target: str = "session") -> None:
        """One row of a login (``granted``: what the session got) or of a ChangePassword call,
        written off the event loop; a database failure is logged, never raised into the
        session's handling."""
        try:
            await asyncio.to_thread(self.records.audit, user, action, target, None, granted, result,
                                    self._wall_clock(), origin="opcua", peer=peer,
                                    certificate=thumbprint(certificate) if certificate else "")
        except Exception:
            log.exception("audit record of the %s of %s from %s", action, user, peer)

    async def serve_create_session(self, processor: Any, body: Any, proceed) -> Any:
        """Around asyncua's CreateSession: a refused one (an untrusted, expired or foreign
        client certificate; too many sessions) in the audit trail, and gone: asyncua 2.1 keeps
        the session it made before the certificate check until the connection closes, where it
        would hold one of ``max_sessions`` for a client nobody trusts."""
        before = processor.session
        try:
            return await proceed()
        except (ServiceError, ua.UaStatusCodeError) as e:
            made = processor.session
            if made is not None and made is not before and made.state == SessionState.Created:
                await made.close_session(True)
                processor.session = before
            try:
                params = struct_from_binary(ua.CreateSessionParameters, body)
            except Exception:
                params = ua.CreateSessionParameters()
            certificate = bytes(params.ClientCertificate or b"")
            peer = _peer_text(processor.name)
            await self._audit("-", peer, certificate, _result(e.code, ""))
            await self._session_event(processor, params, certificate, peer, e.code)
            raise

    async def serve_activate_session(self, processor: Any, requesthdr: Any, body: Any, proceed) -> Any:
        """Around asyncua's ActivateSession: decide the login here (check_async), let asyncua
        run with that decision (get_user), audit the outcome."""
        iserver = processor.iserver
        session = processor.session or iserver.lookup_external_session(requesthdr.AuthenticationToken)
        policy = processor._connection.security_policy
        certificate = bytes(policy.peer_certificate or b"")
        peer = _peer_text(processor.name)
        try:
            params = struct_from_binary(ua.ActivateSessionParameters, body)
        except Exception:
            return await proceed()
        token = params.UserIdentityToken
        if isinstance(token, ua.ExtensionObject) and token.TypeId == ua.NodeId(ua.ObjectIds.Null):
            token = ua.AnonymousIdentityToken()             # Part 4 §5.6.3, as asyncua reads it
        label = token.UserName if isinstance(token, ua.UserNameIdentityToken) else "anonymous"
        attempt, reason = None, ""
        if session is None or session.state == SessionState.Closed:
            pass                                            # asyncua answers BadSessionIdInvalid
        elif not _signature_ok(policy, session, params):
            reason = "invalid client signature"
        elif not isinstance(token, iserver.supported_tokens):
            reason = "anonymous not allowed" if isinstance(token, ua.AnonymousIdentityToken) \
                else f"{type(token).__name__} not offered"
        elif isinstance(token, ua.UserNameIdentityToken):
            try:
                username, password = await asyncio.to_thread(iserver.decrypt_user_token, session, token)
            except Exception:
                reason = "invalid identity token"
            else:
                attempt = await self.check_async(username, password, certificate, processor.name)
        elif isinstance(token, ua.AnonymousIdentityToken):
            attempt = await self.check_async(None, None, certificate, processor.name)
        context = _attempt.set(attempt)
        must_change = attempt is not None and password_change_pending(attempt.user)
        if must_change:
            _answer_password_change_required(processor)
        try:
            result = await proceed()
        except Exception as e:
            code = getattr(e, "code", ua.StatusCodes.BadInternalError)
            why = attempt.reason if attempt is not None and attempt.reason else reason
            await self._audit(label, peer, certificate, _result(code, why))
            await self._activation_event(processor, requesthdr, session, params, token, label, peer,
                                         certificate, code, why)
            raise
        finally:
            _attempt.reset(context)
            if must_change:
                del processor.send_response
        user = session.user if session is not None else None
        role = getattr(user, "tempering_role", None)
        granted = (f"role {role}" + (f"; {PASSWORD_CHANGE_REQUIRED}: may only read until the user "
                                     "sets a new password" if password_change_pending(user) else "")
                   if role else None)
        await self._audit(label, peer, certificate, "Good", granted)
        await self._activation_event(processor, requesthdr, session, params, token, label, peer,
                                     certificate, ua.StatusCodes.Good, granted or "")
        return result

    # ----------------------------------------------------------------------- ChangePassword

    async def change_password(self, parent: Any, *args: Any) -> Any:
        """asyncua's callback of UserManagement.ChangePassword (OPC UA Part 18 §5.2.8;
        OldPassword, NewPassword: Strings) for the user of the calling session. Refused, in
        this order: a session without a user name (BadInvalidState), a channel without
        encryption (BadSecurityModeInsufficient: the passwords travel in the request), not two
        Strings (BadInvalidArgument), a user name, certificate or host locked out
        (BadUserAccessDenied), a new password outside the rules (BadOutOfRange), a wrong old
        one (BadIdentityTokenInvalid; a failed login for the limiter), the same one
        (BadAlreadyExists). Then the new hash is stored, must_change cleared, the session has
        its role's rights from its next request, and a login with the old password fails
        (also within VERIFIED_TTL_S). Every call is in the audit trail, never a password."""
        user = current_user()
        processor = _current_channel.get()
        policy = getattr(getattr(processor, "_connection", None), "security_policy", None)
        certificate = bytes(getattr(policy, "peer_certificate", None) or b"")
        peer = getattr(processor, "name", None)
        label = user.label if isinstance(user, TemperingUser) else "anonymous"
        code, reason = await self._change_password(user, policy, certificate, peer,
                                                   [a.Value if isinstance(a, ua.Variant) else a for a in args])
        await self._audit(label, _peer_text(peer), certificate, _result(code, reason), action="call",
                          target="ChangePassword")
        if code == ua.StatusCodes.Good:
            return []
        log.info("ChangePassword of %s refused: %s", label, reason)
        return ua.StatusCode(code)

    async def _change_password(self, user: Any, policy: Any, certificate: bytes, peer: Any,
                               values: list[Any]) -> tuple[int, str]:
        """(StatusCode, reason) of one ChangePassword call (see ``change_password``)."""
        SC = ua.StatusCodes
        name = getattr(user, "name", None) if isinstance(user, TemperingUser) else None
        if not name:
            return SC.BadInvalidState, "not a session of a user name"
        if getattr(policy, "Mode", None) != ua.MessageSecurityMode.SignAndEncrypt:
            return SC.BadSecurityModeInsufficient, "the channel is not encrypted"
        if len(values) != 2 or not all(isinstance(v, str) for v in values):
            return SC.BadInvalidArgument, "OldPassword and NewPassword are two Strings"
        old, new = values
        keys = self._keys(name, certificate, peer)
        locked = self._locked(keys)
        if locked:
            return SC.BadUserAccessDenied, locked
        try:
            async with self._check_slot():
                await asyncio.to_thread(self.records.change_password, name, old, new)
        except WrongPassword:
            now = self._clock()
            until = self.limiter.failed(keys, now)
            return SC.BadIdentityTokenInvalid, "wrong old password" + (
                f"; now locked out ({until - now:.0f} s)" if until > now else "")
        except SamePassword as e:
            return SC.BadAlreadyExists, e.message
        except InvalidUser as e:
            return SC.BadOutOfRange, f"new password: {e.message}"
        except NoSuchUser:
            return SC.BadUserAccessDenied, "no such user"
        self.limiter.succeeded(("user", name), self._clock())
        self._verified.pop(name, None)          # the old password is not remembered as right
        user.must_change = False                # this session: its role's rights from now on
        log.warning("user %r set a new password", name)
        return SC.Good, ""

    # ----------------------------------------------------------------------- audit events

    async def _emit(self, processor: Any, event: Any) -> None:
        """An audit event on the Server object, for the sessions that see audit (sees_audit);
        a failure is logged, never raised into the session's handling."""
        try:
            await notify(processor.iserver, event, (SERVER,), audience=sees_audit)
        except Exception:
            log.exception("audit event %s", event.Message.Text)

    def _stamp_audit(self, event: Any, processor: Any, ok: bool, code: int, message: str,
                     user: str, entry: str = "") -> None:
        event.Message = ua.LocalizedText(message)
        event.Severity = 100 if ok else 500
        event.Status = ok
        event.StatusCodeId = ua.StatusCode(code)
        event.ClientUserId = user
        event.ClientAuditEntryId = entry or ""
        event.ServerId = self.server_id
        event.ActionTimeStamp = datetime.datetime.now(datetime.timezone.utc)
        event.SecureChannelId = str(getattr(getattr(processor._connection, "security_token", None),
                                            "ChannelId", ""))

    async def _activation_event(self, processor: Any, requesthdr: Any, session: Any, params: Any,
                                token: Any, label: str, peer: str, certificate: bytes, code: int,
                                why: str) -> None:
        """AuditActivateSessionEventType (Part 5 §6.4.8) for one ActivateSession."""
        ok = ua.StatusCode(code).is_good()
        where = f"from {peer or 'an unknown peer'}" + (
            f" (client certificate {thumbprint(certificate)[:16]})" if certificate else "")
        message = (f"session of {label} {where}: " +
                   (f"activated{f' ({why})' if why else ''}" if ok else f"refused: {_result(code, why)}"))
        event = new_event(ua.ObjectIds.AuditActivateSessionEventType, SERVER, "Server")
        self._stamp_audit(event, processor, ok, code, message, label,
                          getattr(requesthdr, "AuditEntryId", "") or "")
        event.SessionId = session.session_id if session is not None else ua.NodeId()
        event.ClientSoftwareCertificates = list(getattr(params, "ClientSoftwareCertificates", None) or [])
        event.UserIdentityToken = _without_secret(token)
        await self._emit(processor, event)

    async def _session_event(self, processor: Any, params: Any, certificate: bytes, peer: str,
                             code: int) -> None:
        """AuditCreateSessionEventType (Part 5 §6.4.7) for a CreateSession refused (an
        untrusted, expired or foreign certificate; too many sessions)."""
        app = getattr(getattr(params, "ClientDescription", None), "ApplicationUri", None) or "?"
        what = (f"client certificate {thumbprint(certificate)[:16]} ({_certificate_name(certificate)})"
                if certificate else "no client certificate")
        message = f"session from {peer or 'an unknown peer'}, {app}, {what}: refused: {_result(code, '')}"
        event = new_event(ua.ObjectIds.AuditCreateSessionEventType, SERVER, "Server")
        self._stamp_audit(event, processor, False, code, message, "")
        event.SessionId = ua.NodeId()
        event.ClientApplicationUri = app if app != "?" else None
        event.ClientCertificate = certificate or None
        event.ClientCertificateThumbprint = thumbprint(certificate) if certificate else None
        await self._emit(processor, event)


def _without_secret(token: Any) -> Any:
    """The identity token as the client sent it, less its secret (Part 5 §6.4.8: never the
    password): a copy with Password / TokenData emptied and their EncryptionAlgorithm."""
    if token is None or isinstance(token, ua.ExtensionObject):
        return None
    clean = copy.copy(token)
    for secret in ("Password", "TokenData"):
        if hasattr(clean, secret):
            setattr(clean, secret, b"")
            clean.EncryptionAlgorithm = None
    return clean


def _certificate_name(der: bytes) -> str:
    try:
        return _load_cert(der).subject.rfc4514_string()
    except ValueError:
        return "not a certificate"


def _result(code: int, reason: str) -> str:
    name = ua.StatusCode(code).name
    return f"{name}: {reason}" if reason else name


def _answer_password_change_required(processor: Any) -> None:
    """Make the processor answer the ActivateSession being handled with Good_PasswordChangeRequired
    (Part 4 §5.7.3, Part 18 §5.2.8), until ``del processor.send_response``."""
    send = processor.send_response

    def send_response(requesthandle, seqhdr, response, *args, **kwargs):
        if isinstance(response, ua.ActivateSessionResponse):
            response.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.GoodPasswordChangeRequired)
        return send(requesthandle, seqhdr, response, *args, **kwargs)
    processor.send_response = send_response


def _peer_text(peer: Any) -> str:
    """``host:port`` of a socket's peer name (``[host]:port`` for IPv6)."""
    if not peer:
        return ""
    host, port = str(peer[0]), peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _signature_ok(policy: Any, session: Any, params: Any) -> bool:
    """The client's signature of ActivateSession, checked as asyncua will (cheap): a forged
    request costs no password check."""
    data = session.nonce if policy.host_certificate is None else policy.host_certificate + session.nonce
    try:
        policy.asymmetric_cryptography.verify(data, params.ClientSignature.Signature)
    except Exception:
        return False
    return True


_CREATE_SESSION = ua.NodeId(ua.ObjectIds.CreateSessionRequest_Encoding_DefaultBinary)
_ACTIVATE_SESSION = ua.NodeId(ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary)


def _one_session_per_channel(processor: Any, typeid: ua.NodeId, requesthdr: Any) -> None:
    """asyncua 2.1 keeps one session per secure channel and runs every request as that
    session's user, whatever AuthenticationToken the request carries: a second CreateSession on
    a channel would replace the first, and a request of the first would run (and be audited) as
    the second's user. So: a second session on a live channel is refused (BadTooManySessions;
    a client opens one channel per session), and a request whose token is not the channel's
    session's is refused (BadSessionIdInvalid, Part 4 §7.32)."""
    session = processor.session
    if session is None or getattr(processor, "_closing", False):
        return
    if typeid == _CREATE_SESSION:
        raise ServiceError(ua.StatusCodes.BadTooManySessions)
    token = getattr(requesthdr, "AuthenticationToken", None)
    if typeid not in _DISCOVERY and token is not None and token != session.auth_token:
        raise ServiceError(ua.StatusCodes.BadSessionIdInvalid)


_DISCOVERY = frozenset(ua.NodeId(i) for i in (
    ua.ObjectIds.GetEndpointsRequest_Encoding_DefaultBinary,
    ua.ObjectIds.FindServersRequest_Encoding_DefaultBinary,
    ua.ObjectIds.FindServersOnNetworkRequest_Encoding_DefaultBinary,
    ua.ObjectIds.CloseSecureChannelRequest_Encoding_DefaultBinary))


def _install_session_hooks() -> None:
    """Wrap asyncua 2.1's ``UaProcessor._process_message`` (once per process) so that a
    server whose InternalServer has a ``tempering_logins`` (a TemperingUserManager) runs
    CreateSession and ActivateSession through it; every other server and message is untouched."""
    if getattr(UaProcessor._process_message, "_tempering_hook", False):
        return
    original = UaProcessor._process_message

    async def _process_message(self, typeid, requesthdr, seqhdr, body):
        logins = getattr(self.iserver, "tempering_logins", None)
        if logins is not None:
            _one_session_per_channel(self, typeid, requesthdr)
        _current_session.set(self.session)
        _current_channel.set(self)
        if logins is None or typeid not in (_CREATE_SESSION, _ACTIVATE_SESSION):
            return await original(self, typeid, requesthdr, seqhdr, body)
        mine = body.copy()                  # asyncua reads ``body``; we read our own copy

        def proceed():
            return original(self, typeid, requesthdr, seqhdr, body)
        if typeid == _CREATE_SESSION:
            return await logins.serve_create_session(self, mine, proceed)
        return await logins.serve_activate_session(self, requesthdr, mine, proceed)

    _process_message._tempering_hook = True
    UaProcessor._process_message = _process_message


_current_user: contextvars.ContextVar[TemperingUser | None] = contextvars.ContextVar(
    "tempering_opcua_user", default=None)


_current_session: contextvars.ContextVar[Any] = contextvars.ContextVar("tempering_opcua_session", default=None)
#: The UaProcessor (one secure channel) of the request being handled: its peer and security.
_current_channel: contextvars.ContextVar[Any] = contextvars.ContextVar("tempering_opcua_channel", default=None)


def current_session_id() -> ua.NodeId | None:
    """The SessionId of the request being handled (as ``current_user``); None outside one."""
    session = _current_session.get()
    return getattr(session, "session_id", None)


def current_user() -> TemperingUser | None:
    """The user of the request being handled, inside asyncua's handling of it: a write's
    value setter or callback, or an ``async`` method handler. asyncua handles each connection's
    requests one after the other in one task; TemperingRuleset sets this before each request.
    Not visible in a *sync* method handler (asyncua runs those in a thread pool): write method
    handlers as ``async def``. None outside a request."""
    return _current_user.get()


_ids = lambda names: frozenset(ua.NodeId(i) for i in names)  # noqa: E731
_ALL_USER_SERVICES = _ids(USER_TYPES)
_NEVER = _ids(ADMIN_TYPES)   # AddNodes, DeleteNodes, Add/DeleteReferences, RegisterServer(2)


class TemperingRuleset(PermissionRuleset):
    """Which services a session may use (asyncua asks before every request of an activated
    session; False is answered BadUserAccessDenied). Every authenticated role may read, browse,
    subscribe, history-read, write and call: each written node and each method then checks the
    role it needs, answers BadUserAccessDenied per item and records the attempt in the audit
    trail (``opcua_server.gate``), so a viewer's attempt is refused *and* on record. Nobody:
    node management from the network."""

    def check_validity(self, user: Any, action_type_id: ua.NodeId, body: Any) -> bool:
        tempering = user if isinstance(user, TemperingUser) else None
        _current_user.set(tempering)
        if tempering is None or action_type_id in _NEVER:
            return False
        return action_type_id in _ALL_USER_SERVICES


# --------------------------------------------------------------------------- the server


async def _user_management(server, manager: TemperingUserManager) -> None:
    """Server.ServerConfiguration.UserManagement (Part 18 §5.2): ChangePassword bound to the
    user manager; PasswordLength the rules' range, PasswordOptions SupportInitialPasswordChange
    (bit 0). AddUser, ModifyUser, RemoveUser and Users stay unserved (``tempering users``)."""
    from .records import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH

    server.link_method(server.get_node(CHANGE_PASSWORD), manager.change_password)
    ids = ua.ObjectIds
    for nodeid, variant in (
            (ids.UserManagement_PasswordLength,
             ua.Variant(ua.Range(Low=float(MIN_PASSWORD_LENGTH), High=float(MAX_PASSWORD_LENGTH)))),
            (ids.UserManagement_PasswordOptions, ua.Variant(1, ua.VariantType.UInt32)),
            (ids.UserManagement_PasswordRestrictions,
             ua.Variant(ua.LocalizedText(f"{MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters; "
                                         "not the old password")))):
        await server.write_attribute_value(ua.NodeId(nodeid), ua.DataValue(variant))

_POLICY_TYPES: dict[str, tuple[ua.SecurityPolicyType, ua.SecurityPolicyType]] = {
    "Basic256Sha256": (ua.SecurityPolicyType.Basic256Sha256_Sign,
                       ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt),
    "Aes128_Sha256_RsaOaep": (ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
                              ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt),
    "Aes256_Sha256_RsaPss": (ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
                             ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt),
}

NONE_POLICY_WARNING = ("WARNING: the OPC UA endpoint {endpoint} also offers security policy None: "
                       "messages are neither signed nor encrypted (allowed on loopback only; set "
                       "opcua.allow_none_policy: false to turn it off)")


async def configure_security(server, settings, records, pki: Pki | None = None, *,
                             app_uri: str | None = None, hostname: str | None = None) -> TemperingUserManager:
    """Secure an asyncua ``Server`` after ``server.init()`` and before ``server.start()``:
    the endpoint (``settings.endpoint``), the application URI (``app_uri``, else the server's),
    the own certificate (made on first start), the security policies of ``settings`` in Sign
    and SignAndEncrypt (and None, with a loud warning on stderr, only if allowed and the
    endpoint is loopback), the identity tokens (user name; anonymous only if allowed), the user
    manager with its login limiter, audit and ActivateSession hook, the per-role ruleset, the
    client certificate check and the server limits (limits.apply_limits). Returns the user
    manager.
    ``settings`` is an ``opcua_server.config.OpcUaSettings``; ``pki`` defaults to
    ``Pki(settings.pki_dir)``."""
    from .config import is_loopback

    if settings.allow_none_policy and not is_loopback(settings.host):
        raise ValueError(f"opcua.allow_none_policy: may be true only with a loopback endpoint, "
                         f"not {settings.host}")
    pki = pki if pki is not None else Pki(settings.pki_dir)
    server.set_endpoint(settings.endpoint)
    if app_uri is not None:
        await server.set_application_uri(app_uri)
    app_uri = server.get_application_uri()
    hostname = hostname or socket.gethostname()
    cert_path, key_path = pki.ensure_own_certificate(app_uri, hostname, extra_hosts=(settings.host,))
    await server.load_certificate(str(cert_path))
    await server.load_private_key(str(key_path))

    policies = [t for name in settings.security_policies for t in _POLICY_TYPES[name]]
    if settings.allow_none_policy:
        policies.append(ua.SecurityPolicyType.NoSecurity)
        print(NONE_POLICY_WARNING.format(endpoint=settings.endpoint), file=sys.stderr, flush=True)
        log.warning(NONE_POLICY_WARNING.format(endpoint=settings.endpoint))
    server.set_security_policy(policies, permission_ruleset=TemperingRuleset())
    tokens: list[type] = [ua.UserNameIdentityToken]
    if settings.allow_anonymous:
        tokens.append(ua.AnonymousIdentityToken)
    server.set_identity_tokens(tokens)
    server.allow_remote_admin(False)
    manager = TemperingUserManager(records, pki=pki, allow_anonymous=settings.allow_anonymous,
                                   allow_unsecured=settings.allow_none_policy,
                                   limiter=LoginLimiter.from_settings(settings),
                                   parallel_checks=settings.login_max_parallel_checks)
    manager.server_id = app_uri
    server.iserver.set_user_manager(manager)
    await _user_management(server, manager)
    # the Server object is where a client watches for every event (audit events among them)
    await server.get_node(SERVER).set_event_notifier([ua.EventNotifier.SubscribeToEvents])
    _install_session_hooks()
    server.iserver.tempering_logins = manager
    server.set_certificate_validator(pki.validate_client)
    apply_limits(server, settings)
    return manager
