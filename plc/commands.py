"""Commands into the scan, and the events it reports. Plain frozen values.

Every operator action (an OPC UA write or method call, the CLI) becomes one of these commands
with the user behind it; the runtime queues them and the next scan drains the queue. The scan
answers each command with a ``command_accepted`` or ``command_refused`` event; a refusal carries
the reason and ``code``, the name of the OPC UA status code it maps to (``BadInvalidState`` for
a command the state does not allow; the alarm commands' codes are listed in ``plc.alarms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Command:
    """``user``: who asked; ``id``: unique per request, so its verdict (the scan's
    ``command_accepted`` / ``command_refused`` event carries it) finds its way back to the
    caller and into the audit trail; ``origin``: where it came from (``opcua``, ``console``,
    ``auto-start``, ``supervisor``, ...)."""
    user: str = field(default="", kw_only=True)
    id: str = field(default="", kw_only=True)
    origin: str = field(default="", kw_only=True)

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True, slots=True)
class StartRecipe(Command):
    recipe_id: str


@dataclass(frozen=True, slots=True)
class Hold(Command):
    """Pause the sequence: timers stop, temperatures are held, pouring is not released."""


@dataclass(frozen=True, slots=True)
class Resume(Command):
    """Continue a held sequence, or one interrupted by a restart."""


@dataclass(frozen=True, slots=True)
class Stop(Command):
    """End pouring normally: the batch is complete, outputs go off."""


@dataclass(frozen=True, slots=True)
class Abort(Command):
    """End the batch at once from any running state: outputs go off."""


@dataclass(frozen=True, slots=True)
class Reset(Command):
    """Clear latched trips whose conditions are gone. Never restarts anything."""


@dataclass(frozen=True, slots=True)
class Acknowledge(Command):
    """Acknowledge one alarm (None: every unacknowledged one). ``event_id``: the EventId the
    operator saw (OPC UA Part 9 §5.7.3); refused when it is not the alarm's last event."""
    alarm_id: str | None = None
    comment: str = ""
    event_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class Confirm(Command):
    """Confirm an acknowledged alarm (Part 9 §5.7.4)."""
    alarm_id: str
    comment: str = ""
    event_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class AddComment(Command):
    """Attach an operator comment to an alarm (Part 9 §5.5.6)."""
    alarm_id: str
    comment: str
    event_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class Shelve(Command):
    """Shelve an alarm for ``duration_s`` (0 < s <= the configured maximum), or one-shot
    (None: until the active alarm clears). Part 9 §5.8.10; ISA-18.2 §11.3. What is shelved is
    the annunciation: interlocks and trips are untouched."""
    alarm_id: str
    duration_s: float | None = None
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Unshelve(Command):
    alarm_id: str
    comment: str = ""


@dataclass(frozen=True, slots=True)
class SetAlarmEnabled(Command):
    """Take an alarm out of service (False) or back (True); Part 9 §5.5.4 Disable / Enable.
    A disabled alarm annunciates nothing; its interlock still acts."""
    alarm_id: str
    enabled: bool
    comment: str = ""


@dataclass(frozen=True, slots=True)
class SetManual(Command):
    zone: str
    output_pct: float | None  # None returns the zone to automatic (bumpless)


@dataclass(frozen=True, slots=True)
class SetTrim(Command):
    zone: str
    trim_k: float  # operator set-point trim added to the recipe goal, within +-MAX_TRIM_K


@dataclass(frozen=True, slots=True)
class SetTuning(Command):
    """Change a zone's PID gains at run time (None keeps a gain). Bumpless: the integral term
    carries over. ``kp`` %/K, ``ki`` %/(K*s), ``kd`` %*s/K, each within 0..MAX_GAIN."""
    zone: str
    kp: float | None = None
    ki: float | None = None
    kd: float | None = None


@dataclass(frozen=True, slots=True)
class StartAutotune(Command):
    """Identify a zone and propose PI gains (``plc.autotune``): technician, while heating.
    ``amplitude_pct``: the relay's and the step's output amplitude (None: the machine's)."""
    zone: str
    amplitude_pct: float | None = None


@dataclass(frozen=True, slots=True)
class AbortAutotune(Command):
    """End the running autotune now; the zone returns to closed loop without a bump."""
    zone: str | None = None


@dataclass(frozen=True, slots=True)
class AcceptTuning(Command):
    """Apply a zone's autotune proposal: its gains, bumpless, persisted like SetTuning."""
    zone: str


@dataclass(frozen=True, slots=True)
class RejectTuning(Command):
    """Discard a zone's autotune proposal; the gains stay as they are."""
    zone: str


@dataclass(frozen=True, slots=True)
class Shutdown(Command):
    """The controller is stopping cleanly (Ctrl-C): end any batch, outputs safe."""


MAX_TRIM_K = 2.0
AMPLITUDE_PCT = (5.0, 100.0)     # the autotune amplitude a technician may ask for
MAX_GAIN = 1000.0


@dataclass(frozen=True, slots=True)
class Event:
    kind: str            # phase | batch_start | batch_end | alarm | alarm_system | trip |
                         # pouring_released | command_accepted | command_refused | autotune
    time_s: float
    message: str
    data: tuple[tuple[str, object], ...] = ()

    def get(self, key: str, default: object = None) -> object:
        return dict(self.data).get(key, default)
