"""The historian's settings: the machine file's optional ``historian:`` section.

Validated once at start-up like the rest of the machine file (``tempering check-config``): an
unknown field, a wrong type or a sink without what it needs is an error naming the field.
Credentials may be written in the file (``token``, ``password``) or, better, named by the
environment variable that holds them (``token_env``, ``password_env``); ``secret()`` resolves
them at start-up. They are never logged and never shown by ``repr``.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, SecretStr, model_validator

from plc.configbase import _NOTHING, Flag, Int, Number, Text, _Frozen, _Problems


class SinkSettings(_Frozen):
    """Where the samples go: ``local`` (embedded SQLite store, the default), ``influxdb1``
    (InfluxDB 1.x ``/write``) or ``influxdb2`` (the v2 write API of InfluxDB 2.x / 3.x)."""

    kind: Literal["local", "influxdb1", "influxdb2"] = "local"
    # local store
    path: Text = "var/history.sqlite"            # relative to the working directory
    retention_days: Annotated[Number, Field(gt=0)] = 30
    # InfluxDB (both)
    url: Text | None = None                      # http(s)://host:8086
    verify_tls: Flag = True
    ca_file: Text | None = None
    timeout_s: Annotated[Number, Field(gt=0, le=300)] = 10.0
    gzip: Flag = True
    # InfluxDB 1.x
    database: Text | None = None
    retention_policy: Text | None = None
    username: Text | None = None
    password: SecretStr | None = None
    password_env: Text | None = None
    # InfluxDB 2.x / 3.x
    token: SecretStr | None = None
    token_env: Text | None = None
    org: Text | None = None
    bucket: Text | None = None

    @model_validator(mode="after")
    def _complete(self) -> SinkSettings:
        need = {"influxdb1": ("url", "database"), "influxdb2": ("url", "org", "bucket")}.get(self.kind, ())
        problems = [((name,), f"required when kind is {self.kind}", _NOTHING)
                    for name in need if getattr(self, name) is None]
        if self.kind == "influxdb2" and self.token is None and self.token_env is None:
            problems.append((("token",), "required when kind is influxdb2 (or token_env)", _NOTHING))
        for secret, env in (("password", "password_env"), ("token", "token_env")):
            if getattr(self, secret) is not None and getattr(self, env) is not None:
                problems.append(((env,), f"give {secret} or {env}, not both", getattr(self, env)))
        if problems:
            raise _Problems(problems)
        return self

    def secret(self, name: Literal["password", "token"]) -> str | None:
        """The password or token: from the file, or from the environment variable named by
        ``<name>_env`` (None if that variable is not set)."""
        value = getattr(self, name)
        if value is not None:
            return value.get_secret_value()
        env = getattr(self, f"{name}_env")
        return os.environ.get(env) if env else None


class HistorianSettings(_Frozen):
    enabled: Flag = True
    sample_interval_ms: Annotated[Int, Field(ge=100, le=3_600_000)] = 1000
    deadband_c: Annotated[Number, Field(ge=0)] = 0.0     # 0: every sample is written
    max_silence_s: Annotated[Number, Field(gt=0)] = 60.0  # with a deadband: a sample at least this often
    spool_dir: Text = "var/spool"
    spool_max_mb: Annotated[Number, Field(gt=0)] = 512
    spool_when_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    fsync_interval_ms: Annotated[Int, Field(ge=0, le=60_000)] = 1000
    batch_max_lines: Annotated[Int, Field(ge=1, le=5000)] = 5000
    retry_max_s: Annotated[Number, Field(gt=0, le=3600)] = 30.0
    sink: SinkSettings = SinkSettings()
