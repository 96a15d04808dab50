"""The application's configuration: the PLC's machine file plus the twin's section.

``plc`` never imports ``twin`` or ``historian``; this composition root adds the optional ``twin:``
and ``historian:`` sections to the machine model, so one file describes a machine and its simulation and ``check-config`` validates
both at once. The ``opcua:`` section (OpcUaSettings) is the OPC UA server's: its endpoint, where
its certificates and records live, and how strict its security is.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from plc.config import MachineConfig, RecipeBook, load_all
from plc.configbase import _NOTHING, Flag, Int, Number, Slug, Text, _Frozen, _Problems
from historian.config import HistorianSettings
from twin.config import TwinConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "tempering-machine.yaml"

#: The security policies the server may offer (OPC UA Part 7 profiles), each in the modes Sign
#: and SignAndEncrypt. None is not one of them: it is ``allow_none_policy``, loopback only.
SecurityPolicyName = Literal["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
DEFAULT_POLICIES: tuple[SecurityPolicyName, ...] = (
    "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpcUaSettings(_Frozen):
    """The ``opcua:`` section. Secure by default: encrypted endpoints only, no anonymous session.

    ``endpoint`` is ``opc.tcp://host:port`` (an optional path after it is kept); the server
    listens on that host. ``data_dir`` (relative to the working directory) holds ``pki/`` (own,
    trusted and rejected certificates) and, without ``database_url``, the SQLite records
    ``tempering.db``. ``database_url`` is an SQLAlchemy URL (``postgresql+psycopg://...``).
    ``allow_none_policy`` offers the unencrypted None endpoint too, accepted only on a loopback
    endpoint (a local engineering tool), and announced loudly at start-up. The ``login_*``
    settings rate-limit failed logins (opcua_server.limits.LoginLimiter); ``max_*`` and
    ``min_*_interval_ms`` bound what clients may ask of the server (opcua_server.limits)."""

    endpoint: Text = "opc.tcp://127.0.0.1:4840"
    data_dir: Text = "var/opcua"
    database_url: Text | None = None
    # the recipe book: null, the machine's own (kept under its machine.id); a name: the plant
    # library of that name, shared by every machine naming it (opcua_server.records.book_of)
    recipe_library: Slug | None = None
    security_policies: Annotated[list[SecurityPolicyName], Field(min_length=1)] = list(DEFAULT_POLICIES)
    allow_anonymous: Flag = False       # True: anonymous sessions, with the viewer role (read only)
    allow_none_policy: Flag = False
    publish_interval_ms: Annotated[Int, Field(ge=10, le=60_000)] = 100
    # failed logins (opcua_server.limits.LoginLimiter): counted per user name, and per client
    # certificate and per client host; a progressive delay before each further check, then a
    # lock-out without any password check
    login_max_failures: Annotated[Int, Field(ge=1, le=1000)] = 5        # per user name
    login_max_failures_per_client: Annotated[Int, Field(ge=1, le=10_000)] = 20   # per certificate, per host
    login_window_s: Annotated[Number, Field(gt=0, le=86_400)] = 300.0   # failures older than this are forgotten
    login_lockout_s: Annotated[Number, Field(ge=0, le=86_400)] = 300.0
    login_delay_s: Annotated[Number, Field(ge=0, le=60)] = 0.5          # after 1 failure; doubles per failure
    login_delay_max_s: Annotated[Number, Field(ge=0, le=60)] = 4.0     # below clients' request timeouts
    # password checks at once: each takes a core and 128 MiB for ~0.5 s (scrypt); 1 leaves the
    # other cores to the PLC, a burst of logins queues
    login_max_parallel_checks: Annotated[Int, Field(ge=1, le=64)] = 1
    # server limits (opcua_server.limits.apply_limits), answered with the standard StatusCodes
    max_sessions: Annotated[Int, Field(ge=1, le=1000)] = 32                       # BadTooManySessions
    max_subscriptions_per_session: Annotated[Int, Field(ge=1, le=1000)] = 10      # BadTooManySubscriptions
    max_monitored_items_per_session: Annotated[Int, Field(ge=1, le=100_000)] = 2000   # BadTooManyMonitoredItems
    min_sampling_interval_ms: Annotated[Number, Field(ge=0, le=60_000)] = 100.0   # smaller ones are revised up
    min_publishing_interval_ms: Annotated[Number, Field(ge=0, le=60_000)] = 100.0

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "opc.tcp" or not parts.hostname or port is None or not 0 < port < 65536 \
                or parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("must be opc.tcp://host:port (e.g. opc.tcp://127.0.0.1:4840)")
        return value

    @field_validator("security_policies")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each policy at most once")
        return value

    @model_validator(mode="after")
    def _none_only_on_loopback(self) -> OpcUaSettings:
        if self.allow_none_policy and not is_loopback(self.host):
            raise _Problems([(("allow_none_policy",), "may be true only with a loopback endpoint "
                              f"(127.0.0.1, ::1 or localhost), not {self.host}", _NOTHING)])
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.endpoint).port or 0

    @property
    def pki_dir(self) -> Path:
        return Path(self.data_dir) / "pki"

    @property
    def records_url(self) -> str:
        """``database_url``, or the SQLite file ``<data_dir>/tempering.db``."""
        return self.database_url or f"sqlite:///{Path(self.data_dir) / 'tempering.db'}"


class MonitoringSettings(_Frozen):
    """The ``monitoring:`` section: Prometheus metrics (``/metrics``) and a health check
    (``/healthz``) over HTTP, served by the plant window (never by the PLC). ``listen`` is
    ``host:port``, loopback by default; ``0.0.0.0`` listens on every interface."""

    enabled: Flag = True
    listen: Text = "127.0.0.1:9840"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port (e.g. 127.0.0.1:9840)")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class AppConfig(MachineConfig):
    twin: TwinConfig = TwinConfig()
    historian: HistorianSettings = HistorianSettings()
    opcua: OpcUaSettings = OpcUaSettings()
    monitoring: MonitoringSettings = MonitoringSettings()


def load(path: str | Path | None = None) -> tuple[AppConfig, RecipeBook]:
    """Load and validate the machine file (default: the embedded default machine). With
    ``machine.work_dir`` set, the run-time paths given relative (``machine.state_file``,
    ``opcua.data_dir``, ``historian.spool_dir``, ``historian.sink.path``) come back as paths
    under that directory (``work_dir`` itself relative to the machine file)."""
    path = path or DEFAULT_CONFIG
    cfg, book = load_all(path, model=AppConfig)
    return with_work_dir(cfg, Path(path).resolve().parent), book


def with_work_dir(cfg: AppConfig, machine_dir: Path) -> AppConfig:
    """``cfg`` with its relative run-time paths under ``machine.work_dir`` (relative to
    ``machine_dir``, the machine file's directory); ``cfg`` itself without a work_dir."""
    if cfg.machine.work_dir is None:
        return cfg
    base = machine_dir / cfg.machine.work_dir

    def under(value: str) -> str:
        return value if Path(value).is_absolute() else str(base / value)

    sink = cfg.historian.sink
    return cfg.model_copy(update={
        "machine": cfg.machine.model_copy(update={"state_file": under(cfg.machine.state_file)}),
        "opcua": cfg.opcua.model_copy(update={"data_dir": under(cfg.opcua.data_dir)}),
        "historian": cfg.historian.model_copy(update={
            "spool_dir": under(cfg.historian.spool_dir),
            "sink": sink.model_copy(update={"path": under(sink.path)})}),
    })
