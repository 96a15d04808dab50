"""Real time-series servers on loopback for the tests and the benchmarks: InfluxDB 1.x
(``influxd``), VictoriaMetrics (``victoria-metrics``) and Prometheus (``prometheus``, scraping
the machine's ``/metrics``), each in its own directory on free ports.

One job: start, stop, restart (same port, same data: for outage tests) and read back. Nothing
here is used by the historian itself; the tests' fixtures (``tests/conftest.py``, which imports
it as ``servers``: ``tests/`` is on ``sys.path`` under pytest, as for ``conftest``) and
``bench/historian.py`` and ``bench/monitoring.py`` (as ``tests.servers``, run from the
repository root) share this code.

Rules
- Processes are started by path from ``$PATH``, with their output in ``<directory>/*.log``; they
  are stopped by PID (SIGTERM, SIGKILL after ``stop_timeout_s``), never by name.
- Every port is loopback and free: InfluxDB's HTTP and RPC (8088) addresses; every other
  listener (graphite, collectd, opentsdb, udp, ifql) stays disabled; usage reporting is off.
- VictoriaMetrics runs with ``-search.latencyOffset=0s`` and ``-search.disableCache`` (fresh
  points are not hidden by the query layer), ``-dedup.minScrapeInterval=1ms`` (a replayed point,
  same series and millisecond, is kept once, as InfluxDB does) and ``-retentionPeriod=100y``. It
  still buffers ingested rows for about a second before they can be searched, even after
  ``/internal/force_flush``: read back with ``wait_export``, which polls.

Errors: ``ServerError(RuntimeError)`` when a server does not start (with the tail of its log) or
a query fails.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable


class ServerError(RuntimeError):
    pass


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, data: bytes | None = None, timeout_s: float = 10.0,
          headers: dict[str, str] | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def make_certificate(directory: str | Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (IP SAN), made by ``openssl``: ``(cert, key)``
    PEM files in ``directory``; the certificate is its own CA file."""
    cert, key = Path(directory) / "server.crt", Path(directory) / "server.key"
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServerError("openssl is not installed")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class _Process:
    """A server process of ours: start it, wait until ``ready()``, stop it by PID."""

    binary = ""
    stop_timeout_s = 15.0

    def __init__(self, directory: str | Path, port: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or find_free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.directory / f"{Path(self.binary).name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def after_start(self) -> None:
        pass

    def start(self, timeout_s: float = 30.0) -> "_Process":
        """Start (again, on the same port and data) and wait until it answers."""
        if self.running:
            return self
        exe = shutil.which(self.binary)
        if exe is None:
            raise ServerError(f"{self.binary} is not installed (make system-deps)")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([exe, *self.command()[1:]], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.directory, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.binary} exited with {self.proc.returncode}: "
                                  f"{self.log_tail()}")
            try:
                if self.ready():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise ServerError(f"{self.binary} did not answer within {timeout_s} s: "
                                  f"{self.log_tail()}")
            time.sleep(0.05)
        self.after_start()
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the process by its PID: SIGTERM (a clean shutdown), SIGKILL after
        ``stop_timeout_s``; ``kill=True`` sends SIGKILL at once. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def restart(self, timeout_s: float = 30.0) -> "_Process":
        self.stop()
        return self.start(timeout_s)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------ InfluxDB


INFLUXDB_CONF = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{dir}/meta"
  retention-autocreate = true
  logging-enabled = false

[data]
  dir = "{dir}/data"
  wal-dir = "{dir}/wal"
  wal-fsync-delay = "0s"
  query-log-enabled = false
  index-version = "inmem"

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{port}"
  auth-enabled = {auth}
  log-enabled = false
  https-enabled = {https}
  https-certificate = "{cert}"
  https-private-key = "{key}"
  pprof-enabled = false
  max-body-size = 25000000

[logging]
  level = "warn"
  suppress-logo = true

[continuous_queries]
  enabled = false

[ifql]
  enabled = false

[[graphite]]
  enabled = false

[[collectd]]
  enabled = false

[[opentsdb]]
  enabled = false

[[udp]]
  enabled = false
"""


class InfluxServer(_Process):
    """``influxd -config <directory>/influxdb.conf``: meta, data and wal under ``directory``,
    HTTP on ``127.0.0.1:port``, RPC on another free loopback port; ``database`` is created on
    every start (CREATE DATABASE is idempotent).

    ``username`` / ``password``: authentication on (``auth-enabled``), that admin user created at
    the first start; the helpers below use it. ``tls=True``: HTTPS with a self-signed
    certificate for 127.0.0.1 (``.ca_file``), ``url`` is then ``https://...``."""

    binary = "influxd"

    def __init__(self, directory: str | Path, port: int | None = None, *,
                 database: str = "tempering", username: str | None = None,
                 password: str | None = None, tls: bool = False):
        super().__init__(directory, port)
        self.database = database
        self.username = username
        self.password = password
        self.tls = tls
        self.rpc_port = find_free_port()
        self.config_path = self.directory / "influxdb.conf"
        self.ca_file: Path | None = None
        self._key_file: Path | None = None
        self._context: ssl.SSLContext | None = None
        if tls:
            self.ca_file, self._key_file = make_certificate(self.directory)
            self._context = ssl.create_default_context(cafile=str(self.ca_file))

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        self.config_path.write_text(INFLUXDB_CONF.format(
            dir=self.directory.resolve(), port=self.port, rpc_port=self.rpc_port,
            auth=str(self.username is not None).lower(), https=str(self.tls).lower(),
            cert=self.ca_file or "", key=self._key_file or ""))
        return [self.binary, "-config", str(self.config_path)]

    def _headers(self) -> dict[str, str]:
        if self.username is None:
            return {}
        token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def ready(self) -> bool:
        status, _ = _http("GET", f"{self.url}/ping", timeout_s=1.0, context=self._context)
        return status == 204

    def after_start(self) -> None:
        if self.username is not None:
            # With no user yet, InfluxDB takes this one statement without credentials.
            status, body = _http("POST", f"{self.url}/query", data=urllib.parse.urlencode({
                "q": f"CREATE USER \"{self.username}\" WITH PASSWORD '{self.password}' "
                     "WITH ALL PRIVILEGES"}).encode(), context=self._context, headers={
                "Content-Type": "application/x-www-form-urlencoded", **self._headers()})
            if status != 200:
                raise ServerError(f"CREATE USER: HTTP {status}: {body[:300]!r}")
        self.query(f'CREATE DATABASE "{self.database}"', database=None, method="POST")

    def query(self, influxql: str, database: str | None = "", *, method: str = "GET",
              epoch: str = "ns") -> dict[str, Any]:
        """Run InfluxQL through ``/query`` on ``database`` (default: the server's; None: none)
        with ``epoch`` timestamps; the decoded JSON. Raises ServerError on an HTTP error or a
        statement error. Statements that change things (CREATE, DROP) need ``method="POST"``."""
        params = {"q": influxql, "epoch": epoch}
        db = self.database if database == "" else database
        if db:
            params["db"] = db
        qs = urllib.parse.urlencode(params)
        if method == "GET":
            status, body = _http("GET", f"{self.url}/query?{qs}", headers=self._headers(),
                                 context=self._context)
        else:
            status, body = _http("POST", f"{self.url}/query", data=qs.encode(),
                                 context=self._context, headers={
                                     "Content-Type": "application/x-www-form-urlencoded",
                                     **self._headers()})
        if status != 200:
            raise ServerError(f"query {influxql!r}: HTTP {status}: {body[:300]!r}")
        doc = json.loads(body)
        for result in doc.get("results", []):
            if "error" in result:
                raise ServerError(f"query {influxql!r}: {result['error']}")
        return doc

    def rows(self, influxql: str) -> list[dict[str, Any]]:
        """The rows of the first statement's series as dicts (column -> value); tags included."""
        out = []
        for result in self.query(influxql).get("results", []):
            for series in result.get("series", []):
                tags = series.get("tags", {})
                for values in series.get("values", []):
                    out.append({**tags, **dict(zip(series["columns"], values))})
        return out

    def write(self, lines: Iterable[str], precision: str = "ns") -> None:
        """A plain ``/write`` (for preparing data; the sinks are what is under test)."""
        status, body = _http("POST", f"{self.url}/write?db={self.database}&precision={precision}",
                             data="\n".join(lines).encode(), headers=self._headers(),
                             context=self._context)
        if status != 204:
            raise ServerError(f"write: HTTP {status}: {body[:300]!r}")


# ------------------------------------------------------------------------------ VictoriaMetrics


class VictoriaMetricsServer(_Process):
    """``victoria-metrics -storageDataPath <directory>/data -httpListenAddr 127.0.0.1:port``
    with fresh points visible to queries (see the module docstring). It takes InfluxDB line
    protocol at ``/write`` and ``/api/v2/write`` (any token, org, bucket); a measurement ``m``
    with field ``f`` becomes the series ``m_f``, timestamps are kept to the millisecond."""

    binary = "victoria-metrics"

    def command(self) -> list[str]:
        return [self.binary, f"-storageDataPath={self.directory.resolve() / 'data'}",
                f"-httpListenAddr=127.0.0.1:{self.port}", "-search.latencyOffset=0s",
                "-search.disableCache", "-dedup.minScrapeInterval=1ms", "-retentionPeriod=100y",
                "-loggerLevel=WARN"]

    def ready(self) -> bool:
        status, _ = _http("GET", f"{self.url}/health", timeout_s=1.0)
        return status == 200

    def flush(self) -> None:
        """Ask the server to make what it ingested searchable (``/internal/force_flush``)."""
        _http("GET", f"{self.url}/internal/force_flush")

    def export(self, match: str) -> list[dict[str, Any]]:
        """``/api/v1/export`` of the series selector ``match``: one dict per series with
        ``metric`` (labels), ``values`` and ``timestamps`` (ms)."""
        status, body = _http("POST", f"{self.url}/api/v1/export",
                             data=urllib.parse.urlencode({"match[]": match}).encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        if status != 200:
            raise ServerError(f"export {match!r}: HTTP {status}: {body[:300]!r}")
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def wait_export(self, match: str, points: int, timeout_s: float = 15.0,
                    settle_s: float = 1.5) -> list[dict[str, Any]]:
        """Poll ``export(match)`` until it holds at least ``points`` samples (or ``timeout_s``),
        then once more after ``settle_s`` (the ingestion buffer) so that extra samples, if any,
        show up too. Returns the last export."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.flush()
            series = self.export(match)
            if sum(len(s["values"]) for s in series) >= points or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(settle_s)
        self.flush()
        return self.export(match)

    def query(self, promql: str) -> dict[str, Any]:
        """``/api/v1/query`` (MetricsQL instant query); the decoded JSON."""
        status, body = _http("POST", f"{self.url}/api/v1/query",
                             data=urllib.parse.urlencode({"query": promql}).encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        if status != 200:
            raise ServerError(f"query {promql!r}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)


class PrometheusServer(_Process):
    """``prometheus`` scraping ``targets`` (host:port, path ``/metrics``) every ``interval_s``,
    its data and config in ``directory``, its API on a free loopback port."""

    binary = "prometheus"

    def __init__(self, directory: str | Path, targets: Iterable[str], interval_s: float = 1.0,
                 port: int | None = None, scrape_configs: list[dict] | None = None):
        """``scrape_configs``: these instead of one job ``tempering`` scraping ``targets``."""
        super().__init__(directory, port)
        self.config_path = self.directory / "prometheus.yml"
        self.config_path.write_text(json.dumps({        # JSON is YAML
            "global": {"scrape_interval": f"{round(interval_s * 1000)}ms",     # whole units only
                       "scrape_timeout": f"{round(min(interval_s, 10.0) * 900)}ms"},
            "scrape_configs": scrape_configs or [{"job_name": "tempering",
                                                  "static_configs": [{"targets": list(targets)}]}],
        }, indent=1))

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def ready(self) -> bool:
        return _http("GET", f"{self.url}/-/ready", timeout_s=1.0)[0] == 200

    def query(self, promql: str) -> list[dict[str, Any]]:
        """``/api/v1/query`` (instant, now): the result vector."""
        status, body = _http("POST", f"{self.url}/api/v1/query",
                             data=urllib.parse.urlencode({"query": promql}).encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        if status != 200:
            raise ServerError(f"query {promql!r}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The first series' value of ``promql`` now; None when there is none."""
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, ok: Callable[[float], bool], timeout_s: float = 30.0) -> float:
        """Poll ``value(promql)`` until ``ok(value)``; ServerError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.value(promql)
            if v is not None and ok(v):
                return v
            if time.monotonic() > deadline:
                raise ServerError(f"{promql}: {v} after {timeout_s:g} s; {self.log_tail(500)}")
            time.sleep(0.25)
