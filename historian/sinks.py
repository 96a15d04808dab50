"""Sinks: where the forwarder delivers line-protocol batches (InfluxDB 1.x, the InfluxDB v2 write
API, or the embedded local store).

One job: write a batch of lines, all or raise, and say by the kind of exception whether sending
the very same bytes again can ever succeed. A sink keeps nothing: the spool in front of it holds
every line until ``write`` returns, so a sink only has to be honest about failures.

Rules
- Lines carry nanosecond timestamps fixed when they were sampled; every sink writes with
  precision ``ns``. A replay (the batch sent again after a timeout whose answer was lost) writes
  the very same points, which InfluxDB and the local store keep once (same series and time:
  the point is overwritten). VictoriaMetrics does the same only with ``-dedup.minScrapeInterval``
  (``tests/servers.py`` starts it with ``1ms``).
- Bodies are gzip-compressed (``Content-Encoding: gzip``) unless ``gzip=False``.
- Credentials (password, token) go in headers only, never in a URL, a ``name``, a message, a
  log line or an exception; anything a server echoes back is redacted too.

Errors (``SinkError(Exception)``: ``.sink`` the sink's name, ``.message`` what happened)
    SinkRejected(SinkError)     the server refuses the data itself: HTTP 400 (malformed line,
        .status                 field type conflict), 413 (too large), 422 (unprocessable); the
                                local store's bad line (``.status`` None). Retrying the same
                                bytes can never succeed: split the batch or set it aside.
    SinkUnavailable(SinkError)  everything worth retrying: connection refused or reset, timeout,
        .status                 DNS, TLS, 5xx, 401/403 (credentials), 404 (database, bucket or
                                org missing), any other status; ``.status`` None when no HTTP
        .retry_after_s          answer came. ``.retry_after_s``: the server's ``Retry-After``
                                on 429 / 503 in seconds from now (delta-seconds or an HTTP
                                date, RFC 9110 §10.2.3), else None.
``.message`` carries the server's own error text (InfluxDB's ``{"error": ...}`` or
``{"message": ...}``), at most ``MESSAGE_MAX_CHARS`` characters.
"""

from __future__ import annotations

import base64
import gzip as gzip_codec
import http.client
import json
import ssl
import threading
import time
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol, Sequence
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    from historian.config import SinkSettings
    from historian.local import LocalStore

#: Statuses meaning "this data is refused as such"; every other failure is worth a retry.
REJECTED_STATUSES = frozenset({400, 413, 422})
#: Longest server message kept in an exception (a 400 quotes the bad line, which may be long).
MESSAGE_MAX_CHARS = 500
#: gzip level of request bodies: level 1 is several times faster than the default 9 and line
#: protocol (repetitive tags) still shrinks about 8x, so the forwarder is never CPU-bound on it.
GZIP_LEVEL = 1
REDACTED = "***"


class SinkError(Exception):
    """A batch was not written. ``.sink``: the sink's name; ``.message``: what happened."""

    def __init__(self, sink: str, message: str, status: int | None = None,
                 retry_after_s: float | None = None):
        super().__init__(f"{sink}: {message}")
        self.sink = sink
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s


class SinkRejected(SinkError):
    """The server refuses the data itself (400, 413, 422): retrying the same bytes cannot help."""


class SinkUnavailable(SinkError):
    """The data could not be delivered now (network, server, credentials, missing database)."""


class Sink(Protocol):
    name: str

    def write(self, lines: Sequence[str]) -> None: ...

    def close(self) -> None: ...


def error_for_status(sink: str, status: int, message: str,
                     retry_after: str | None = None) -> SinkError:
    """The exception an HTTP error ``status`` stands for (see the module docstring);
    ``retry_after``: the answer's ``Retry-After`` header, kept on 429 and 503."""
    kind = SinkRejected if status in REJECTED_STATUSES else SinkUnavailable
    return kind(sink, f"HTTP {status}: {message}" if message else f"HTTP {status}", status,
                retry_after_seconds(retry_after) if status in (429, 503) else None)


def retry_after_seconds(value: str | None, now_s: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from ``now_s`` (epoch s, default now): delay-seconds
    (``"120"``) or an HTTP date (``"Wed, 21 Oct 2015 07:28:00 GMT"``), never negative; None
    when absent or unreadable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now_s is None else now_s))


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """``text`` with every non-empty secret replaced by ``***``, cut to MESSAGE_MAX_CHARS."""
    for s in secrets:
        if s:
            text = text.replace(s, REDACTED)
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_MAX_CHARS else text[:MESSAGE_MAX_CHARS - 3] + "..."


def public_url(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user:password@, username, password)`` of an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("sink url must be http://host[:port] or https://host[:port]")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return clean, parts.username, parts.password


def _server_message(body: bytes, headers: http.client.HTTPMessage | None, reason: str) -> str:
    """InfluxDB's error text: the JSON body's ``error``/``message``, else the X-Influxdb-Error
    header, else the body as text, else the HTTP reason."""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
        if isinstance(doc, dict):
            for key in ("error", "message"):
                if isinstance(doc.get(key), str) and doc[key]:
                    return doc[key]
    except ValueError:
        pass
    header = headers.get("X-Influxdb-Error") if headers is not None else None
    return header or text or reason


def _tls_context(verify_tls: bool, ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _body(sink: str, lines: Sequence[str]) -> bytes:
    try:
        return ("\n".join(lines) + "\n").encode("utf-8")
    except UnicodeEncodeError as e:
        raise SinkRejected(sink, f"a line is not encodable as UTF-8: {e.reason}") from None


# --------------------------------------------------------------------------------- InfluxDB 1.x


class Influx1Sink:
    """InfluxDB 1.x: ``POST {url}/write?db=..&rp=..&precision=ns`` over one kept-alive
    connection (http.client), credentials as HTTP basic auth. ``timeout_s`` bounds connecting
    and every read/write on the socket. Thread-safe (one request at a time)."""

    def __init__(self, url: str, database: str, retention_policy: str | None = None,
                 username: str | None = None, password: str | None = None, *,
                 verify_tls: bool = True, ca_file: str | None = None, timeout_s: float = 10.0,
                 gzip: bool = True):
        clean, url_user, url_password = public_url(url)
        username = username if username is not None else url_user
        password = password if password is not None else url_password
        self.url = clean
        self.database = database
        self.retention_policy = retention_policy
        self.username = username
        self.timeout_s = timeout_s
        self.gzip = gzip
        self.name = f"influxdb1 {clean} db={database}" + (
            f" rp={retention_policy}" if retention_policy else "")
        self._secrets = tuple(s for s in (password,) if s)
        parts = urlsplit(clean)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._tls = _tls_context(verify_tls, ca_file) if self._https else None
        query = {"db": database, "precision": "ns"}
        if retention_policy:
            query["rp"] = retention_policy
        self._path = f"{parts.path}/write?{urlencode(query, quote_via=quote)}"
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if gzip:
            self._headers["Content-Encoding"] = "gzip"
        if username is not None or password is not None:
            token = base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Influx1Sink({self.name!r})"

    __str__ = __repr__

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(self._host, self._port,
                                                         timeout=self.timeout_s, context=self._tls)
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port,
                                                        timeout=self.timeout_s)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def write(self, lines: Sequence[str]) -> None:
        """Write every line (all or raise SinkRejected / SinkUnavailable); nothing to do for []."""
        if not lines:
            return
        body = _body(self.name, lines)
        if self.gzip:
            body = gzip_codec.compress(body, compresslevel=GZIP_LEVEL)
        with self._lock:
            status, reason, headers, answer = self._post(body)
        if 200 <= status < 300:
            return
        message = redact(_server_message(answer, headers, reason), self._secrets)
        raise error_for_status(self.name, status, message, headers.get("Retry-After"))

    def _post(self, body: bytes) -> tuple[int, str, http.client.HTTPMessage, bytes]:
        # A kept-alive connection may have been closed by the server meanwhile (restart, idle
        # timeout): that shows up as a reset or an empty answer on the first use. Sending again
        # on a fresh connection is safe because a write is idempotent (same points, same times).
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=body, headers=self._headers)
                resp = conn.getresponse()
                answer = resp.read()
                if resp.will_close:
                    self._drop_connection()
                return resp.status, resp.reason, resp.headers, answer
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                self._drop_connection()
                if reused and attempt == 1:
                    continue
                raise SinkUnavailable(self.name, self._describe(e)) from e
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                raise SinkUnavailable(self.name, self._describe(e)) from e
        raise AssertionError("unreachable")

    def _describe(self, e: BaseException) -> str:
        kind = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
        detail = str(e)
        text = f"{kind}: {detail}" if detail and detail != kind else kind
        return redact(f"cannot reach {self.url}: {text}", self._secrets)

    def close(self) -> None:
        with self._lock:
            self._drop_connection()


# ------------------------------------------------------------------------ InfluxDB v2 write API


class Influx2Sink:
    """The InfluxDB v2 write API (InfluxDB 2.x, 3.x, and what speaks it: VictoriaMetrics'
    ``/api/v2/write``) through influxdb-client's synchronous write API (``POST
    {url}/api/v2/write?org=..&bucket=..&precision=ns``, ``Authorization: Token ..``). The client
    never retries on its own: failures come back at once as SinkRejected / SinkUnavailable."""

    def __init__(self, url: str, token: str, org: str, bucket: str, *, verify_tls: bool = True,
                 ca_file: str | None = None, timeout_s: float = 10.0, gzip: bool = True):
        from influxdb_client import InfluxDBClient
        from influxdb_client.client.write_api import SYNCHRONOUS

        clean, _, url_password = public_url(url)
        self.url = clean
        self.org = org
        self.bucket = bucket
        self.timeout_s = timeout_s
        self.gzip = gzip
        self.name = f"influxdb2 {clean} org={org} bucket={bucket}"
        self._secrets = tuple(s for s in (token, url_password) if s)
        self._client = InfluxDBClient(url=clean, token=token, org=org,
                                      timeout=max(1, round(timeout_s * 1000)), enable_gzip=gzip,
                                      verify_ssl=verify_tls, ssl_ca_cert=ca_file, retries=False)
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Influx2Sink({self.name!r})"

    __str__ = __repr__

    def write(self, lines: Sequence[str]) -> None:
        """Write every line (all or raise SinkRejected / SinkUnavailable); nothing to do for []."""
        from influxdb_client import WritePrecision
        from influxdb_client.client.exceptions import InfluxDBError
        from urllib3.exceptions import HTTPError

        if not lines:
            return
        body = _body(self.name, lines)
        try:
            with self._lock:
                self._write_api.write(self.bucket, self.org, record=body,
                                      write_precision=WritePrecision.NS)
        except InfluxDBError as e:
            status = getattr(e, "status", None)
            if status is None and getattr(e, "response", None) is not None:
                status = getattr(e.response, "status", None)
            message = redact(self._message(e), self._secrets)
            if status is None:
                raise SinkUnavailable(self.name, message) from None
            headers = getattr(getattr(e, "response", None), "headers", None) or {}
            raise error_for_status(self.name, int(status), message,
                                   headers.get("Retry-After")) from None
        except (HTTPError, OSError) as e:
            raise SinkUnavailable(self.name, redact(
                f"cannot reach {self.url}: {type(e).__name__}: {e}", self._secrets)) from None

    @staticmethod
    def _message(e: Any) -> str:
        message = getattr(e, "message", None)
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if isinstance(message, str) and message:
            return message
        body = getattr(e, "body", None)
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        return body or getattr(e, "reason", None) or type(e).__name__

    def close(self) -> None:
        with self._lock:
            self._write_api.close()
            self._client.close()


# -------------------------------------------------------------------------------- local store


class LocalSink:
    """The embedded store (``historian.local.LocalStore``): ``store.write_lines(lines)``. A line
    the store cannot parse (ValueError) is SinkRejected; anything else (disk full, locked
    database) SinkUnavailable. ``close()`` closes the store only if ``close_store``."""

    def __init__(self, store: LocalStore, *, close_store: bool = False):
        self.store = store
        self.close_store = close_store
        self.name = f"local {getattr(store, 'path', '')}".rstrip()

    def __repr__(self) -> str:
        return f"LocalSink({self.name!r})"

    __str__ = __repr__

    def write(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        try:
            self.store.write_lines(list(lines))
        except ValueError as e:
            raise SinkRejected(self.name, redact(str(e), ())) from None
        except Exception as e:
            raise SinkUnavailable(self.name, redact(f"{type(e).__name__}: {e}", ())) from e

    def close(self) -> None:
        if self.close_store:
            self.store.close()


# ----------------------------------------------------------------------------------- factory


def _secret(settings: Any, name: str) -> str | None:
    """The password / token of the settings: ``settings.secret(name)`` (file or ``<name>_env``)
    when the settings have it, else the plain attribute. A ``<name>_env`` naming an unset
    variable is a configuration error (ValueError naming the variable, never a value)."""
    if hasattr(settings, "secret"):
        value = settings.secret(name)
    else:
        value = getattr(settings, name, None)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
    env = getattr(settings, f"{name}_env", None)
    if value is None and env:
        raise ValueError(f"sink.{name}_env: environment variable {env} is not set")
    return value


def make_sink(settings: SinkSettings) -> Sink:
    """The sink ``settings.kind`` names: ``influxdb1`` -> Influx1Sink, ``influxdb2`` ->
    Influx2Sink, ``local`` -> LocalSink over a LocalStore at ``settings.path`` (owned: closing
    the sink closes it)."""
    kind = settings.kind
    if kind == "influxdb1":
        return Influx1Sink(settings.url, settings.database, settings.retention_policy,
                           settings.username, _secret(settings, "password"),
                           verify_tls=settings.verify_tls, ca_file=settings.ca_file,
                           timeout_s=settings.timeout_s, gzip=settings.gzip)
    if kind == "influxdb2":
        token = _secret(settings, "token")
        if token is None:
            raise ValueError("sink.token: required when kind is influxdb2 (or token_env)")
        return Influx2Sink(settings.url, token, settings.org, settings.bucket,
                           verify_tls=settings.verify_tls, ca_file=settings.ca_file,
                           timeout_s=settings.timeout_s, gzip=settings.gzip)
    if kind == "local":
        from historian.local import LocalStore
        return LocalSink(LocalStore(settings.path, settings.retention_days), close_store=True)
    raise ValueError(f"sink.kind: unknown sink kind {kind!r}")
