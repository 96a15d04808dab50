"""The application's configuration: the PLC's machine file plus the twin's section.

``plc`` never imports ``twin`` or ``historian``; this composition root adds the optional ``twin:``
and ``historian:`` sections to the machine model, so one file describes a machine and its simulation and ``check-config`` validates
both at once.
"""

from __future__ import annotations

from pathlib import Path

from plc.config import MachineConfig, RecipeBook, load_all
from historian.config import HistorianSettings
from twin.config import TwinConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "tempering-machine.yaml"


class AppConfig(MachineConfig):
    twin: TwinConfig = TwinConfig()
    historian: HistorianSettings = HistorianSettings()


def load(path: str | Path | None = None) -> tuple[AppConfig, RecipeBook]:
    """Load and validate the machine file (default: the embedded default machine)."""
    return load_all(path or DEFAULT_CONFIG, model=AppConfig)
