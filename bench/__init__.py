"""Benchmarks: each prints a table and, with ``--json``, one JSON object as the last line."""
