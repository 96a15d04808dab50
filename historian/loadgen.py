"""Moved: the load generator is ``bench/loadgen.py`` (``python -m bench.loadgen``); it is a
benchmark tool, not part of the historian.

This forwarder only keeps ``python -m historian.loadgen`` working from the repository root for
``tests/test_historian_delivery.py``, which still starts it under its old name; delete this file
once that test runs ``-m bench.loadgen``. Nothing may import it.
"""

from __future__ import annotations

import runpy

if __name__ == "__main__":
    runpy.run_module("bench.loadgen", run_name="__main__", alter_sys=True)
