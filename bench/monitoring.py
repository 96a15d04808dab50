"""The PLC's scan while a real Prometheus scrapes the plant window's ``/metrics`` every second,
next to the same run left alone.

    python -m bench.monitoring [--json] [--idle-s N] [--scraped-s N] [--priority MODE] [--keep DIR]

What runs: ``tempering run`` exactly as ``bench.isolation`` starts it (twin over Modbus TCP, the
PLC scanning at 100 ms, the plant window with OPC UA and the historian, the default recipe from
molten chocolate, ``--scan-log``), in a temporary directory on free loopback ports. Once
``/healthz`` answers 200 and the start has settled:

- ``idle``: nothing scrapes for ``--idle-s`` (30 s);
- ``scraped``: Debian's ``prometheus`` (``PrometheusServer``, started once the idle window is
  over and given ``PAUSE_S`` to settle) scrapes ``/metrics`` every second for ``--scraped-s``
  (30 s); its own ``scrape_duration_seconds`` and ``scrape_samples_scraped`` over that window
  say what a scrape cost the window.

The lateness figures come from the PLC's scan log, cut by wall time to each window (the same
``bench.isolation.scan_stats``). JSON keys: ``late_ms_p50_idle``, ``late_ms_p99_idle``,
``late_ms_max_idle``, ``overruns_idle``, ``scans_idle`` and the same with ``_scraped``;
``scrape_ms_p50``, ``scrape_ms_max``, ``scrapes``, ``samples_per_scrape``, ``cores``.

``PrometheusServer`` (``tests/servers.py``) is the tests' one too (``tests/test_metrics.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.servers import PrometheusServer, _http  # the tests' servers; run from the repository root

SETTLE_S = 5.0
PAUSE_S = 3.0
SCRAPE_INTERVAL_S = 1.0


async def _healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (await asyncio.to_thread(_http, "GET", f"{url}/healthz", None, 2.0))[0] != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/healthz not 200 within {timeout_s:g} s")
        await asyncio.sleep(0.5)


async def measure(args) -> dict:
    from .isolation import Machine, Run, scan_stats, wait_scan_log
    from .opcua import client_certificate

    out: dict[str, Any] = {"cores": os.cpu_count(), "scrape_interval_s": SCRAPE_INTERVAL_S}
    tmp = Path(tempfile.mkdtemp(prefix="bench-monitoring-"))
    prom = None
    try:
        cert, _ = client_certificate(tmp / "client-pki")
        m = Machine(tmp / "run", cert, secrets.token_urlsafe(12))
        listen = m.cfg.monitoring.listen
        run = Run(m, args.priority)
        try:
            await run.start()
            await run.wait_line(r"^metrics: http", 0, 60.0)
            await _healthy(f"http://{listen}", 60.0)
            out["plc_scheduling"] = run.line_text(r"^plc: pid").partition("scheduling ")[2].partition(";")[0]
            await asyncio.sleep(SETTLE_S)
            t0 = time.time()
            await asyncio.sleep(args.idle_s)
            t1 = time.time()
            prom = await asyncio.to_thread(PrometheusServer(tmp / "prometheus", [listen], SCRAPE_INTERVAL_S).start)
            await asyncio.sleep(PAUSE_S)
            t2 = time.time()
            await asyncio.sleep(args.scraped_s)
            t3 = time.time()
            window = f"[{int(args.scraped_s)}s]"
            q = lambda e: prom.value(e)    # noqa: E731
            out["scrape_ms_p50"] = 1e3 * await asyncio.to_thread(
                q, f"quantile_over_time(0.5, scrape_duration_seconds{window})")
            out["scrape_ms_max"] = 1e3 * await asyncio.to_thread(q, f"max_over_time(scrape_duration_seconds{window})")
            out["scrapes"] = int(await asyncio.to_thread(q, f"count_over_time(up{window})"))
            out["scrapes_failed"] = int(await asyncio.to_thread(q, f"count_over_time(up{window}) - sum_over_time(up{window})") or 0)
            out["samples_per_scrape"] = int(await asyncio.to_thread(q, "scrape_samples_scraped"))
            recs = await wait_scan_log(m, t3)
            for name, (a, b) in (("idle", (t0, t1)), ("scraped", (t2, t3))):
                s = scan_stats(recs, a, b)
                for key in ("scans", "late_ms_p50", "late_ms_p99", "late_ms_max", "overruns"):
                    out[f"{key}_{name}"] = s[key]
        finally:
            if prom is not None:
                prom.stop()
            await run.stop()
    finally:
        if args.keep:
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from .common import emit, fmt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--scraped-s", type=float, default=30.0)
    ap.add_argument("--priority", choices=("auto", "realtime", "nice", "none"), default="auto",
                    help="the PLC process's scheduling, passed to tempering run (default auto)")
    ap.add_argument("--keep", metavar="DIR", help="copy the temporary directory (logs) here at the end")
    args = ap.parse_args(argv)
    out = asyncio.run(measure(args))
    rows = [(name, str(out[f"scans_{name}"]), fmt(out[f"late_ms_p50_{name}"]), fmt(out[f"late_ms_p99_{name}"]),
             fmt(out[f"late_ms_max_{name}"]), str(out[f"overruns_{name}"]))
            for name in ("idle", "scraped")]
    print(f"PLC scan while Prometheus scrapes /metrics every {SCRAPE_INTERVAL_S:g} s: tempering run "
          f"(twin over Modbus TCP, 100 ms scan), {out['cores']} cores, PLC scheduling: "
          f"{out.get('plc_scheduling') or '?'}")
    emit(rows, ("window", "scans", "late p50 ms", "late p99 ms", "late max ms", "overruns"), out, as_json=False)
    print(f"scrapes: {out['scrapes']} ({out['scrapes_failed']} failed), {out['samples_per_scrape']} samples "
          f"each, scrape time p50 {fmt(out['scrape_ms_p50'], 2)} ms, max {fmt(out['scrape_ms_max'], 2)} ms")
    if args.json:
        sys.stdout.flush()
        print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
