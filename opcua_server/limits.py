"""What the OPC UA server refuses to do too much of: failed logins, sessions, subscriptions,
monitored items, and too fast sampling or publishing.

One job: no client, however clumsy or hostile, can make the server (and the scan that shares
its event loop) spend unbounded time or memory. Two parts:

- LoginLimiter: pure logic (no clock, no I/O, no asyncua; time is an argument). Failed logins are counted
  per key: the user name (``("user", name)``), the client certificate (``("certificate",
  thumbprint)``) and the client's host (``("peer", host)``). Before a check, the caller waits
  ``delay_s(keys, now)``: ``login_delay_s`` after one failure within ``login_window_s``,
  doubling with each further one, at most ``login_delay_max_s``. A key that reaches its limit
  (``login_max_failures`` for a user name, ``login_max_failures_per_client`` for a certificate
  or a host: a shared HMI should not be locked by one person's typing) is locked for
  ``login_lockout_s``: ``locked_until(keys, now)`` is then > now and the caller refuses without
  checking any password. A success forgets the user name's failures (not the certificate's or
  the host's: a valid account must not wash away a spray of guesses at other names). The
  caller (security.TemperingUserManager) does the waiting, with asyncio.sleep.
- apply_limits(server, settings): asyncua 2.1 has a server-wide subscription cap
  (``iserver.max_subscriptions``) and nothing per session; this adds, per server instance (no
  global patch), a session class that answers (OPC UA Part 4 §5.6.2, §5.13.2, §5.12.2):
  CreateSession beyond ``max_sessions`` with BadTooManySessions; CreateSubscription beyond
  ``max_subscriptions_per_session`` with BadTooManySubscriptions; each monitored item beyond
  ``max_monitored_items_per_session`` with BadTooManyMonitoredItems (the items that fit are
  created); a publishing interval below ``min_publishing_interval_ms`` is revised up to it
  (RevisedPublishingInterval), a sampling interval below ``min_sampling_interval_ms`` too
  (RevisedSamplingInterval; asyncua samples at the publishing interval, so that, or the
  minimum if larger, is what is announced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.server.internal_session import InternalSession

__all__ = ["LoginLimiter", "LimitedSession", "apply_limits"]

Key = tuple[str, str]          # ("user", name) | ("certificate", thumbprint) | ("peer", host)


@dataclass
class _Record:
    failures: list[float] = field(default_factory=list)    # times within the window, oldest first
    locked_until: float = 0.0


class LoginLimiter:
    """Failed-login counters in virtual time (seconds of any monotonic clock). At most
    ``max_keys`` keys are remembered (the oldest forgotten first), so a flood of made-up user
    names cannot grow it without bound."""

    def __init__(self, *, max_failures: int = 5, max_failures_per_client: int = 20,
                 window_s: float = 300.0, lockout_s: float = 300.0, delay_s: float = 0.5,
                 delay_max_s: float = 4.0, max_keys: int = 10_000):
        self.max_failures = max_failures
        self.max_failures_per_client = max_failures_per_client
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.base_delay_s = delay_s
        self.delay_max_s = delay_max_s
        self.max_keys = max_keys
        self._records: dict[Key, _Record] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> LoginLimiter:
        """From an ``OpcUaSettings`` (its ``login_*`` fields)."""
        return cls(max_failures=settings.login_max_failures,
                   max_failures_per_client=settings.login_max_failures_per_client,
                   window_s=settings.login_window_s, lockout_s=settings.login_lockout_s,
                   delay_s=settings.login_delay_s, delay_max_s=settings.login_delay_max_s)

    def _limit(self, key: Key) -> int:
        return self.max_failures if key[0] == "user" else self.max_failures_per_client

    def _current(self, key: Key, now: float) -> _Record | None:
        """The key's record with expired failures and an ended lock-out forgotten."""
        record = self._records.get(key)
        if record is None:
            return None
        if record.locked_until and record.locked_until <= now:
            record.locked_until = 0.0
            record.failures.clear()           # a lock-out served wipes the slate
        horizon = now - self.window_s
        while record.failures and record.failures[0] <= horizon:
            record.failures.pop(0)
        if not record.failures and not record.locked_until:
            del self._records[key]
            return None
        return record

    def locked_until(self, keys: Iterable[Key], now: float) -> float:
        """The latest end of a lock-out among ``keys``, or 0.0 if none of them is locked."""
        ends = [r.locked_until for r in (self._current(k, now) for k in keys) if r is not None]
        return max(ends, default=0.0)

    def failures(self, keys: Iterable[Key], now: float) -> int:
        """The most failures within the window among ``keys``."""
        return max((len(r.failures) for r in (self._current(k, now) for k in keys) if r is not None),
                   default=0)

    def delay_s(self, keys: Iterable[Key], now: float) -> float:
        """How long to wait before checking a password for ``keys``: 0 without failures, else
        ``delay_s * 2**(failures - 1)``, at most ``delay_max_s``."""
        n = self.failures(keys, now)
        if n == 0:
            return 0.0
        return min(self.base_delay_s * 2.0 ** min(n - 1, 60), self.delay_max_s)

    def failed(self, keys: Iterable[Key], now: float) -> float:
        """Count a failed login against each key; returns ``locked_until(keys, now)`` after it
        (> now if this failure locked one of them, or one was locked already)."""
        keys = list(keys)
        for key in keys:
            record = self._current(key, now) or _Record()
            record.failures.append(now)
            if len(record.failures) >= self._limit(key) and not record.locked_until:
                record.locked_until = now + self.lockout_s
            self._records.pop(key, None)
            self._records[key] = record           # newest last: the oldest are forgotten first
        self._bound(now)
        return self.locked_until(keys, now)

    def succeeded(self, key: Key, now: float) -> None:
        """A right password for ``key`` (a user name): its failures are forgotten. A locked key
        stays locked (the caller does not check passwords of locked keys)."""
        record = self._current(key, now)
        if record is not None and not record.locked_until:
            del self._records[key]

    def _bound(self, now: float) -> None:
        if len(self._records) <= self.max_keys:
            return
        for key in list(self._records):
            self._current(key, now)
        while len(self._records) > self.max_keys:
            del self._records[next(iter(self._records))]


# --------------------------------------------------------------------------- server limits


class LimitedSession(InternalSession):
    """asyncua's session with the per-session limits of ``self.limits`` (OpcUaSettings)."""

    limits: Any = None

    def _subscriptions(self) -> list:
        return [s for s in self.subscription_service.subscriptions.values()
                if s.session_id == self.session_id]

    async def create_subscription(self, params, callback, request_callback=None):
        if len(self._subscriptions()) >= self.limits.max_subscriptions_per_session:
            self.logger.warning("session %s: refused a subscription beyond %d", self.name,
                                self.limits.max_subscriptions_per_session)
            raise ServiceError(ua.StatusCodes.BadTooManySubscriptions)
        params.RequestedPublishingInterval = max(float(params.RequestedPublishingInterval),
                                                 float(self.limits.min_publishing_interval_ms))
        return await super().create_subscription(params, callback, request_callback)

    async def create_monitored_items(self, params):
        have = sum(len(s.monitored_item_srv._monitored_items) for s in self._subscriptions())
        room = max(0, self.limits.max_monitored_items_per_session - have)
        items = list(params.ItemsToCreate)
        refused = items[room:]
        if refused:
            self.logger.warning("session %s: refused %d monitored items beyond %d", self.name,
                                len(refused), self.limits.max_monitored_items_per_session)
            params.ItemsToCreate = items[:room]
        results = await super().create_monitored_items(params) if params.ItemsToCreate else []
        for result in results:
            self._revise_sampling(result)
        for _ in refused:
            results.append(ua.MonitoredItemCreateResult(
                StatusCode=ua.StatusCode(ua.StatusCodes.BadTooManyMonitoredItems)))
        return results

    async def modify_monitored_items(self, params):
        results = await super().modify_monitored_items(params)
        for result in results:
            self._revise_sampling(result)
        return results

    def _revise_sampling(self, result) -> None:
        if result.StatusCode.is_good():
            result.RevisedSamplingInterval = max(float(result.RevisedSamplingInterval),
                                                 float(self.limits.min_sampling_interval_ms))


def apply_limits(server: Any, settings: Any) -> None:
    """Put the limits of ``settings`` (OpcUaSettings) on an asyncua ``Server`` (after
    ``server.init()``, before ``server.start()``; calling it again replaces them). Sessions
    are asyncua's own with the checks of LimitedSession; the server-wide subscription cap is
    ``max_sessions * max_subscriptions_per_session``."""
    iserver = server.iserver
    iserver.max_subscriptions = settings.max_sessions * settings.max_subscriptions_per_session

    def create_session(name, user=None, external: bool = False):
        if external and len(iserver._external_sessions) >= settings.max_sessions:
            iserver.logger.warning("refused a session from %s: %d sessions already", name,
                                   settings.max_sessions)
            raise ServiceError(ua.StatusCodes.BadTooManySessions)
        kwargs = {} if user is None else {"user": user}
        session = LimitedSession(iserver, iserver.aspace, iserver.subscription_service, name,
                                external=external, **kwargs)
        session.limits = settings
        return session

    iserver.create_session = create_session
