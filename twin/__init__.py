"""The simulated tempering machine (the twin): a stand-in for the real hardware.

``Twin`` is the plant model in virtual time (``twin.plant``); ``TwinConfig`` its typed
parameters (``twin.config``). ``plc`` never imports this package.
"""

from twin.config import TwinConfig
from twin.plant import Twin

__all__ = ["Twin", "TwinConfig"]
