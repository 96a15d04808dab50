"""The application: the ``tempering`` command, the supervisor of the PLC and plant-window
processes, and the live view. The composition root; the PLC lives in ``plc/``, the plant
window in ``opcua_server/`` and ``historian/``, the simulated machine in ``twin/``."""
