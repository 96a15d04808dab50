"""HistoryRead from InfluxDB: the zone temperatures the historian wrote, read back with InfluxQL.

One job: ``InfluxHistory.read_raw`` answers what ``historian.local.LocalStore.read_raw`` answers
(``(ts_ns, value)`` of one field of one measurement, of every series whose tags include the
given ones, in ``[start_ns, end_ns)``), from the InfluxDB the historian's sink writes to, so
``opcua_server.history.LocalHistory`` serves it with the same bounds, continuation points and
StatusCodes as the local store.

The query is InfluxQL over ``GET {url}/query?db=..&epoch=ns&q=..``: InfluxDB 1.x serves it
natively (HTTP basic auth with the sink's username/password); InfluxDB 2.x and 3.x serve it
through their v1-compatibility API, with the sink's token as ``Authorization: Token ..`` and the
bucket as the database (2.x maps ``db`` to a bucket through its DBRP mappings: a bucket is
reachable by its own name through the virtual mapping, ``db/rp`` names a bucket with that
retention policy; 3.x takes the database name). What it reads is what ``historian.schema``
writes::

    SELECT "temp_c" FROM ["rp".]"zone" WHERE "machine" = '..' AND "zone" = '..'
        AND time >= <start_ns> AND time < <end_ns> ORDER BY time [DESC] LIMIT <n>

(no GROUP BY: the series of every batch, recipe and phase of the zone merge into one, by time;
points without ``temp_c``, written while the sensor was faulty, are not selected).

Errors: every failure is ``opcua_server.history.HistoryUnavailable`` (the node's answer is
Bad_DataUnavailable): connection refused, DNS, TLS, timeout (``timeout_s`` bounds connecting and
every read of the socket; ``LocalHistory`` also gives up on the thread after ``timeout_s`` + a
margin), any HTTP status but 200, and a statement error in a 200 answer (``database not found``).
Credentials go in headers only and are redacted from every message.
"""

from __future__ import annotations

import base64
import http.client
import json
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from historian.sinks import _server_message, _tls_context, public_url, redact

from .history import HistoryUnavailable


def quote_ident(name: str) -> str:
    """An InfluxQL identifier: double-quoted, ``"`` and ``\\`` escaped."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_string(value: str) -> str:
    """An InfluxQL string literal: single-quoted, ``'`` and ``\\`` escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def raw_query(measurement: str, field: str, tags: dict[str, str], start_ns: int, end_ns: int,
              limit: int, *, retention_policy: str | None = None,
              newest_first: bool = False) -> str:
    """The InfluxQL of one raw read (pure)."""
    source = quote_ident(measurement)
    if retention_policy:
        source = f"{quote_ident(retention_policy)}.{source}"
    where = [f"{quote_ident(k)} = {quote_string(v)}" for k, v in sorted(tags.items())]
    where += [f"time >= {int(start_ns)}", f"time < {int(end_ns)}"]
    return (f"SELECT {quote_ident(field)} FROM {source} WHERE {' AND '.join(where)} "
            f"ORDER BY time {'DESC' if newest_first else 'ASC'} LIMIT {int(limit)}")


def rows_of(answer: Any) -> list[tuple[int, float | str]]:
    """``(ts_ns, value)`` of a ``/query?epoch=ns`` JSON answer of one statement; its statement
    error as HistoryUnavailable (pure)."""
    try:
        result = answer["results"][0]
    except (KeyError, IndexError, TypeError):
        raise HistoryUnavailable(f"unexpected answer: {str(answer)[:200]}") from None
    if result.get("error"):
        raise HistoryUnavailable(str(result["error"]))
    rows: list[tuple[int, float | str]] = []
    for series in result.get("series") or ():
        rows += [(int(t), v) for t, v in series.get("values") or () if v is not None]
    return rows


class InfluxHistory:
    """The InfluxDB the sink writes to, read with InfluxQL (see the module docstring). Each read
    opens its own connection (reads may overlap; one that hangs holds nobody else)."""

    def __init__(self, url: str, database: str, *, retention_policy: str | None = None,
                 username: str | None = None, password: str | None = None,
                 token: str | None = None, verify_tls: bool = True, ca_file: str | None = None,
                 timeout_s: float = 10.0):
        clean, url_user, url_password = public_url(url)
        username = username if username is not None else url_user
        password = password if password is not None else url_password
        self.url, self.database, self.retention_policy = clean, database, retention_policy
        self.timeout_s = timeout_s
        self.name = f"influxdb {clean} db={database}"
        self._secrets = tuple(s for s in (password, token) if s)
        parts = urlsplit(clean)
        self._https = parts.scheme == "https"
        self._host, self._base = parts.hostname or "", parts.path
        self._port = parts.port or (443 if self._https else 80)
        self._tls = _tls_context(verify_tls, ca_file) if self._https else None
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Token {token}"
        elif username is not None or password is not None:
            basic = base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"

    @classmethod
    def from_settings(cls, settings) -> InfluxHistory:
        """From the historian's ``SinkSettings`` (kind influxdb1 or influxdb2; credentials as the
        sink resolves them). For 2.x/3.x the database is the bucket; ``bucket`` ``db/rp`` names
        its database and retention policy."""
        from historian.sinks import _secret
        common = dict(verify_tls=settings.verify_tls, ca_file=settings.ca_file,
                      timeout_s=settings.timeout_s)
        if settings.kind == "influxdb1":
            return cls(settings.url, settings.database, retention_policy=settings.retention_policy,
                       username=settings.username, password=_secret(settings, "password"), **common)
        if settings.kind == "influxdb2":
            database, _, rp = settings.bucket.partition("/")
            return cls(settings.url, database, retention_policy=rp or None,
                       token=_secret(settings, "token"), **common)
        raise ValueError(f"sink.kind: {settings.kind!r} is not an InfluxDB")

    def __repr__(self) -> str:
        return f"InfluxHistory({self.name!r})"

    def read_raw(self, measurement: str, field: str, tags: dict[str, str], start_ns: int,
                 end_ns: int, limit: int = 10_000, *,
                 newest_first: bool = False) -> list[tuple[int, float | str]]:
        """(ts_ns, value) of one field in [start_ns, end_ns), oldest first (newest first with
        ``newest_first``), at most ``limit``; HistoryUnavailable if InfluxDB cannot answer."""
        q = raw_query(measurement, field, tags, start_ns, end_ns, limit,
                      retention_policy=self.retention_policy, newest_first=newest_first)
        path = f"{self._base}/query?" + urlencode({"db": self.database, "epoch": "ns", "q": q},
                                                    quote_via=quote)
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s,
                                               context=self._tls)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request("GET", path, headers=self._headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            kind = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
            raise HistoryUnavailable(redact(f"cannot reach {self.url}: {kind}: {e}",
                                            self._secrets)) from None
        finally:
            conn.close()
        if resp.status != 200:
            message = redact(_server_message(body, resp.headers, resp.reason), self._secrets)
            raise HistoryUnavailable(f"{self.url}: HTTP {resp.status}: {message}")
        try:
            answer = json.loads(body)
        except ValueError:
            raise HistoryUnavailable(f"{self.url}: not JSON: {body[:200]!r}") from None
        return rows_of(answer)

    def close(self) -> None:
        return None


def history_store(sink_settings, local_store):
    """What HistoryRead reads: the InfluxDB the sink writes to (kind influxdb1 / influxdb2),
    else ``local_store`` (the historian's embedded store, or None)."""
    if sink_settings.kind in ("influxdb1", "influxdb2"):
        return InfluxHistory.from_settings(sink_settings)
    return local_store
