"""The batch report: one page that shows how a batch went, for people.

One job: draw a finished batch (``opcua_server.batches.BatchRecord``) over its zone history as
one page, ``render(record, history, path)``: a PNG or a PDF of that page, or an HTML page with
the picture embedded (base64) and the record's tables (checks, phases, zone statistics, alarms,
operator actions, interruptions). The page has

- a title block: batch id, recipe, machine, clock times, duration, outcome, energy, and the
  verdict (PASS green, FAIL red, INCOMPLETE grey) with its reasons;
- the four zones' temperatures (solid) and set-points (dashed), one colour per zone, in °C over
  minutes since the batch start (clock time on the top axis), the phases shaded and named, the
  quality band (pouring goal ± ``criteria.pouring_band_k``) and the working maximum over the
  pouring phase, interruptions hatched, alarms (red) and operator actions (blue) as numbered
  vertical markers;
- the acceptance checks (✓/✗ with their figures) and the numbered alarms and actions listed.

Drawing uses matplotlib's object API (``Figure``; PNG through Agg, PDF through its PDF backend):
no pyplot, no global state, no display. Times are epoch seconds, shown in the local time zone.

The history comes through ``ZoneHistory.series(zone, field, start_s, end_s)``: ``(t_s, value)``
of one zone field (``temp_c``, ``setpoint_c``, ``output_pct`` of the historian's ``zone``
measurement, ``historian.schema``), oldest first, for one machine (and batch). Three sources:
``StoreHistory`` (the embedded local store, ``historian.local.LocalStore``), ``InfluxQLHistory``
(InfluxDB 1.x ``/query``) and ``FluxHistory`` (InfluxDB 2.x/3.x through influxdb-client);
``history_for(sink_settings, machine_id, batch_id)`` picks the one the historian writes to.

Errors: ``HistoryUnavailable(Exception)`` when an InfluxDB cannot be reached or refuses the
query (``.status``: the HTTP status, None without an answer); ``ValueError`` for a path that
does not end in .png, .pdf or .html.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import ssl
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.lines import Line2D

from plc.contract import ZONES

PAGE_IN = (11.69, 8.27)          # A4 landscape, inches
PNG_DPI = 150                    # 1753 x 1240 pixels
ZONE_COLOURS = {"tank_bottom": "#1f77b4", "tank_wall": "#ff7f0e", "pump": "#2ca02c",
                "fountain": "#9467bd"}
PHASE_COLOURS = {"heating": "#f4a582", "cooling": "#92c5de", "pouring": "#a6dba0"}
VERDICT_COLOURS = {"PASS": "#2e7d32", "FAIL": "#c62828", "INCOMPLETE": "#757575"}
ALARM_COLOUR, ACTION_COLOUR, LIMIT_COLOUR = "#c62828", "#1565c0", "#b71c1c"
LIST_ROWS = 9                    # rows of the checks and of the event list on the page


class HistoryUnavailable(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------ history


class ZoneHistory(Protocol):
    def series(self, zone: str, field: str, start_s: float, end_s: float
               ) -> list[tuple[float, float]]:
        """``(t_s, value)`` of ``field`` of ``zone`` with start_s <= t_s < end_s, oldest first."""
        ...


class StoreHistory:
    """Zone series from the historian's local store, of ``machine_id`` (and ``batch_id``)."""

    def __init__(self, store, machine_id: str, batch_id: str | None = None):
        self.store, self.machine_id, self.batch_id = store, machine_id, batch_id

    def series(self, zone: str, field: str, start_s: float, end_s: float
               ) -> list[tuple[float, float]]:
        tags = {"zone": zone, "machine": self.machine_id}
        if self.batch_id:
            tags["batch"] = self.batch_id
        rows = self.store.read_raw("zone", field, tags, _ns(start_s), _ns(end_s), limit=10**9)
        return [(t / 1e9, float(v)) for t, v in rows if isinstance(v, (int, float))]


def _ns(t_s: float) -> int:
    return int(round(t_s * 1e9))


def _influxql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InfluxQLHistory:
    """Zone series from InfluxDB 1.x: InfluxQL through ``GET {url}/query`` (chunked, epoch ns),
    basic auth. influxdb-client speaks only Flux, which InfluxDB 1.x serves from 1.7 on and only
    with ``flux-enabled``: InfluxQL reads every 1.x."""

    def __init__(self, url: str, database: str, machine_id: str, batch_id: str | None = None, *,
                 retention_policy: str | None = None, username: str | None = None,
                 password: str | None = None, verify_tls: bool = True,
                 ca_file: str | None = None, timeout_s: float = 10.0):
        from historian.sinks import _tls_context, public_url

        clean, url_user, url_password = public_url(url)
        self.url, self.database, self.retention_policy = clean, database, retention_policy
        self.machine_id, self.batch_id, self.timeout_s = machine_id, batch_id, timeout_s
        self._context = _tls_context(verify_tls, ca_file) if clean.startswith("https") else None
        username = username if username is not None else url_user
        password = password if password is not None else url_password
        self._headers = {}
        if username is not None or password is not None:
            token = base64.b64encode(f"{username or ''}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def query(self, field: str, zone: str, start_s: float, end_s: float) -> str:
        where = [f'"machine" = {_influxql_string(self.machine_id)}',
                 f'"zone" = {_influxql_string(zone)}']
        if self.batch_id:
            where.append(f'"batch" = {_influxql_string(self.batch_id)}')
        source = (f'"{self.retention_policy}"."zone"' if self.retention_policy else '"zone"')
        field_id = field.replace('"', '\\"')
        return (f'SELECT "{field_id}" FROM {source} WHERE {" AND ".join(where)} '
                f"AND time >= {_ns(start_s)} AND time < {_ns(end_s)}")

    def series(self, zone: str, field: str, start_s: float, end_s: float
               ) -> list[tuple[float, float]]:
        params = urllib.parse.urlencode({"db": self.database, "epoch": "ns", "chunked": "true",
                                         "chunk_size": "10000",
                                         "q": self.query(field, zone, start_s, end_s)})
        request = urllib.request.Request(f"{self.url}/query?{params}", headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s,
                                        context=self._context) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise HistoryUnavailable(f"{self.url}: HTTP {e.code}: "
                                     f"{e.read()[:300].decode('utf-8', 'replace')}", e.code) from None
        except (OSError, ssl.SSLError) as e:
            raise HistoryUnavailable(f"{self.url}: cannot reach: {e}") from None
        out: list[tuple[float, float]] = []
        for text in body.splitlines():      # chunked: one JSON document per line
            if not text.strip():
                continue
            for result in json.loads(text).get("results", []):
                if "error" in result:
                    raise HistoryUnavailable(f"{self.url}: {result['error']}")
                for s in result.get("series", []):
                    out += [(t / 1e9, float(v)) for t, v in s.get("values", []) if v is not None]
        out.sort()
        return out


class FluxHistory:
    """Zone series from InfluxDB 2.x/3.x (or 1.8+ with Flux): a Flux query through
    influxdb-client's query API."""

    def __init__(self, url: str, token: str, org: str, bucket: str, machine_id: str,
                 batch_id: str | None = None, *, verify_tls: bool = True,
                 ca_file: str | None = None, timeout_s: float = 10.0):
        from influxdb_client import InfluxDBClient

        self.bucket, self.org, self.machine_id, self.batch_id = bucket, org, machine_id, batch_id
        self._client = InfluxDBClient(url=url, token=token, org=org, verify_ssl=verify_tls,
                                      ssl_ca_cert=ca_file, timeout=int(timeout_s * 1000))

    def query(self, field: str, zone: str, start_s: float, end_s: float) -> str:
        def s(text: str) -> str:
            return json.dumps(text)          # a Flux string literal: same escapes as JSON
        where = [f"r._measurement == \"zone\"", f"r._field == {s(field)}",
                 f"r.machine == {s(self.machine_id)}", f"r.zone == {s(zone)}"]
        if self.batch_id:
            where.append(f"r.batch == {s(self.batch_id)}")
        return (f"from(bucket: {s(self.bucket)})\n"
                f"  |> range(start: time(v: {_ns(start_s)}), stop: time(v: {_ns(end_s)}))\n"
                f"  |> filter(fn: (r) => {' and '.join(where)})\n"
                f"  |> group()\n  |> sort(columns: [\"_time\"])\n"
                f"  |> keep(columns: [\"_time\", \"_value\"])")

    def series(self, zone: str, field: str, start_s: float, end_s: float
               ) -> list[tuple[float, float]]:
        from influxdb_client.rest import ApiException

        try:
            records = self._client.query_api().query_stream(
                self.query(field, zone, start_s, end_s), org=self.org)
            return [(r.get_time().timestamp(), float(r.get_value())) for r in records
                    if r.get_value() is not None]
        except ApiException as e:
            raise HistoryUnavailable(f"InfluxDB: HTTP {e.status}: {e.reason}", e.status) from None
        except OSError as e:
            raise HistoryUnavailable(f"InfluxDB: cannot reach: {e}") from None

    def close(self) -> None:
        self._client.close()


def history_for(sink, machine_id: str, batch_id: str | None = None) -> ZoneHistory:
    """The history the historian's sink (``historian.config.SinkSettings``) holds."""
    from historian.sinks import _secret

    if sink.kind == "influxdb1":
        return InfluxQLHistory(sink.url, sink.database, machine_id, batch_id,
                               retention_policy=sink.retention_policy, username=sink.username,
                               password=_secret(sink, "password"), verify_tls=sink.verify_tls,
                               ca_file=sink.ca_file, timeout_s=sink.timeout_s)
    if sink.kind == "influxdb2":
        return FluxHistory(sink.url, _secret(sink, "token") or "", sink.org, sink.bucket,
                           machine_id, batch_id, verify_tls=sink.verify_tls,
                           ca_file=sink.ca_file, timeout_s=sink.timeout_s)
    from historian.local import LocalStore
    return StoreHistory(LocalStore(sink.path, sink.retention_days), machine_id, batch_id)


# ------------------------------------------------------------------------------------- render


def render(record, history: ZoneHistory, path: str | Path) -> Path:
    """Write the report of ``record`` to ``path`` (.png or .pdf: the page; .html: a page with
    the picture and the record's tables); returns the path."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".png", ".pdf", ".html", ".htm"):
        raise ValueError(f"{path}: a report is a .png, .pdf or .html file")
    fig = figure(record, history)
    if kind in (".png", ".pdf"):
        fig.savefig(path, format=kind[1:], dpi=PNG_DPI)
        return path
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    path.write_text(page_html(record, buf.getvalue()), encoding="utf-8")
    return path


def _clock(t_s: float, seconds: bool = True) -> str:
    return datetime.fromtimestamp(t_s, timezone.utc).astimezone().strftime(
        "%H:%M:%S" if seconds else "%H:%M")


def _day(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, timezone.utc).astimezone().strftime("%Y-%m-%d")


def _tz(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, timezone.utc).astimezone().tzname() or ""


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    h, m = divmod(s // 60, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s % 60:02d} s"


def _energy(record) -> str:
    text = f"energy {record.energy_kwh:.2f} kWh"
    if record.energy_kwh_per_kg is not None and record.chocolate_kg:
        text += f" ({record.energy_kwh_per_kg:.3f} kWh/kg of {record.chocolate_kg:g} kg)"
    if record.metered_kwh is not None:
        text += f", metered {record.metered_kwh:.2f} kWh"
    return text


def _gapped(points: Sequence[tuple[float, float]], t0: float) -> tuple[list[float], list[float]]:
    """Minutes since ``t0`` and values, with a NaN wherever the samples stop for more than 5
    typical intervals (an interruption or an outage is a gap, not a straight line)."""
    if not points:
        return [], []
    steps = sorted(b[0] - a[0] for a, b in zip(points, points[1:]))
    limit = 5 * (steps[len(steps) // 2] if steps else 1.0) + 1e-6
    xs, ys = [], []
    for i, (t, v) in enumerate(points):
        if i and t - points[i - 1][0] > limit:
            xs.append(math.nan)
            ys.append(math.nan)
        xs.append((t - t0) / 60.0)
        ys.append(v)
    return xs, ys


def _events(record) -> list[tuple[float, str, str, str]]:
    """(time, tag, colour, text) of the alarms (A1, A2, ...) and operator actions (O1, ...)."""
    out = [(a.time, f"A{i}", ALARM_COLOUR, f"{a.alarm_id} ({a.priority}): {a.message}")
           for i, a in enumerate(sorted(record.alarms, key=lambda a: a.time), 1)]
    out += [(a.time, f"O{i}", ACTION_COLOUR,
             f"{a.action} by {a.user}" + (f": {a.detail}" if a.detail else ""))
            for i, a in enumerate(sorted(record.actions, key=lambda a: a.time), 1)]
    return sorted(out)


def figure(record, history: ZoneHistory) -> Figure:
    """The report page as a matplotlib Figure (nothing written)."""
    t0, t1 = record.started_at, max(record.ended_at, record.started_at + 60.0)
    fig = Figure(figsize=PAGE_IN, dpi=PNG_DPI)
    _title_block(fig, record)
    ax = fig.add_axes((0.065, 0.34, 0.745, 0.445))
    span_min = (t1 - t0) / 60.0

    lows, highs = [], []
    for zone in ZONES:
        colour = ZONE_COLOURS.get(zone, "black")
        for field, style, width in (("temp_c", "-", 1.5), ("setpoint_c", "--", 1.1)):
            xs, ys = _gapped(history.series(zone, field, t0, t1 + 1e-3), t0)
            if xs:
                ax.plot(xs, ys, style, color=colour, linewidth=width, alpha=0.95 if style == "-"
                        else 0.8, label=zone.replace("_", " ") if field == "temp_c" else None)
                finite = [y for y in ys if not math.isnan(y)]
                lows.append(min(finite))
                highs.append(max(finite))
    recipe = record.recipe or {}
    criteria = record.criteria or {}
    pouring = [p for p in record.phases if p.phase == "pouring"]
    goal, band = recipe.get("pouring_goal"), criteria.get("pouring_band_k")
    working_max = recipe.get("working_max")
    for value in (goal, working_max):
        if value is not None:
            lows.append(value)
            highs.append(value)
    low, high = (min(lows), max(highs)) if lows else (15.0, 55.0)
    rng = max(high - low, 5.0)
    # Room below the curves for the event tags and above them for the phase names.
    ax.set_ylim(low - 0.16 * rng, high + 0.12 * rng)
    ax.set_xlim(0.0, span_min)

    label_end = -1.0          # where the last phase name ends (a fraction of the axis)
    for p in record.phases:
        colour = PHASE_COLOURS.get(p.phase, "#d9d9d9")
        a, b = (p.start - t0) / 60.0, (p.end - t0) / 60.0
        ax.axvspan(a, b, color=colour, alpha=0.28, linewidth=0, zorder=0)
        x = a / span_min + 0.006
        if b - a > span_min * 0.02:
            # A name that would run into the one before goes one line lower.
            row = 1 if x < label_end else 0
            label_end = x + 0.0095 * len(p.phase) if row == 0 else label_end
            ax.text(x, 0.975 - 0.055 * row, p.phase, transform=ax.transAxes, ha="left",
                    va="top", fontsize=9, fontweight="bold", color="#333333", clip_on=True)
    for gap in record.interruptions:
        ax.axvspan((gap.start - t0) / 60.0, (gap.end - t0) / 60.0, facecolor="none",
                   edgecolor="#616161", hatch="///", linewidth=0, zorder=0.5)

    # The quality band and the working maximum apply while pouring (the whole batch if it never
    # got there, drawn faint).
    spans = [((p.start - t0) / 60.0, (p.end - t0) / 60.0) for p in pouring] or [(0.0, span_min)]
    faint = not pouring
    for a, b in spans:
        if goal is not None and band:
            ax.fill_between([a, b], goal - band, goal + band, color="#43a047",
                            alpha=0.12 if faint else 0.25, linewidth=0, zorder=1)
            ax.hlines(goal, a, b, colors="#2e7d32", linewidth=0.8, linestyles=":", zorder=1)
        if working_max is not None:
            ax.hlines(working_max, a, b, colors=LIMIT_COLOUR, linewidth=1.4, linestyles="-.",
                      alpha=0.5 if faint else 0.9, zorder=2)
    if working_max is not None:
        ax.annotate(f"working max {working_max:g} °C", (spans[-1][1], working_max),
                    xytext=(-4, 3), textcoords="offset points", ha="right", va="bottom",
                    fontsize=8, color=LIMIT_COLOUR)
    if goal is not None and band:
        ax.annotate(f"pouring {goal:g} ± {band:g} °C", (spans[-1][1], goal - band),
                    xytext=(-4, -3), textcoords="offset points", ha="right", va="top",
                    fontsize=8, color="#2e7d32")

    events = _events(record)
    last_x = [-1e9, -1e9, -1e9]
    for t, tag, colour, _ in events:
        x = (t - t0) / 60.0
        ax.axvline(x, color=colour, linewidth=0.9, alpha=0.7, linestyle=(0, (4, 2)), zorder=3)
        # Tags close in time go on the next row up (3 rows) so they never overlap.
        row = next((i for i in range(3) if x - last_x[i] > span_min * 0.028), None)
        if row is None:
            continue
        last_x[row] = x
        ax.text(x, 0.02 + 0.045 * row, tag, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=7, color="white", fontweight="bold", zorder=4,
                bbox=dict(boxstyle="round,pad=0.2", facecolor=colour, edgecolor="none"))

    ax.set_xlabel("minutes since the batch start")
    ax.set_ylabel("temperature (°C)")
    ax.grid(True, color="#000000", alpha=0.08)
    ax.spines[["right"]].set_visible(False)
    top = ax.secondary_xaxis("top", functions=(lambda m: m, lambda m: m))
    top.set_xticks(ax.get_xticks())
    top.set_xticklabels([_clock(t0 + m * 60.0, seconds=False) for m in ax.get_xticks()],
                        fontsize=8)
    top.set_xlabel(f"clock time ({_tz(t0)})", fontsize=8)
    ax.set_xlim(0.0, span_min)

    handles, _labels = ax.get_legend_handles_labels()
    extra = [Line2D([], [], color="#555555", linestyle="--", linewidth=1.1, label="set-point"),
             Patch(facecolor="#43a047", alpha=0.3, label="pouring band"),
             Line2D([], [], color=LIMIT_COLOUR, linestyle="-.", label="working max"),
             Line2D([], [], color=ALARM_COLOUR, linestyle=(0, (4, 2)), label="alarm (A)"),
             Line2D([], [], color=ACTION_COLOUR, linestyle=(0, (4, 2)), label="operator (O)")]
    if record.interruptions:
        extra.append(Patch(facecolor="white", edgecolor="#616161", hatch="///",
                           label="interruption"))
    ax.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8.5, frameon=False, borderaxespad=0.0)
    phase_handles = [Patch(facecolor=c, alpha=0.5, label=p) for p, c in PHASE_COLOURS.items()]
    fig.legend(handles=phase_handles, loc="upper left", bbox_to_anchor=(0.823, 0.48),
               fontsize=8.5, frameon=False, title="phases", title_fontsize=8.5,
               alignment="left")

    _checks_block(fig, record)
    _events_block(fig, record, events)
    return fig


def _title_block(fig: Figure, record) -> None:
    t0, t1 = record.started_at, record.ended_at
    name = (record.recipe or {}).get("name")
    fig.text(0.02, 0.965, f"Batch {record.batch_id}", fontsize=17, fontweight="bold", va="top")
    fig.text(0.02, 0.922, f"recipe {record.recipe_id}" + (f" ({name})" if name else "")
             + f"   ·   machine {record.machine_id}   ·   started by {record.started_by}"
             + f"   ·   outcome {record.outcome}"
             + (f" (first out: {record.first_out})" if record.first_out else ""),
             fontsize=10, va="top")
    end_day = "" if _day(t1) == _day(t0) else f"{_day(t1)} "
    fig.text(0.02, 0.893, f"{_day(t0)} {_clock(t0)} → {end_day}{_clock(t1)} {_tz(t0)}   ·   "
             f"{_duration(t1 - t0)}   ·   {_energy(record)}   ·   recipe sha256 "
             f"{record.recipe_hash[:12]}", fontsize=10, va="top", color="#333333")
    colour = VERDICT_COLOURS.get(record.verdict, "#757575")
    fig.text(0.975, 0.962, record.verdict, fontsize=20, fontweight="bold", color="white",
             ha="right", va="top",
             bbox=dict(boxstyle="round,pad=0.35", facecolor=colour, edgecolor="none"))
    reasons = list(record.reasons)
    if reasons:     # one line under the title, in the verdict's colour
        fig.text(0.02, 0.866, textwrap.shorten(f"{record.verdict}: " + "; ".join(reasons), 190,
                                               placeholder="… (see the checks below)"),
                 fontsize=10, color=colour, fontweight="bold", va="top")


def _rows(fig: Figure, x: float, title: str, rows: list[tuple[str, str, str]], more: int) -> None:
    """A titled list at ``x``: (mark, colour, text) rows."""
    fig.text(x, 0.245, title, fontsize=10, fontweight="bold", va="top")
    y = 0.215
    for mark, colour, text in rows:
        fig.text(x, y, mark, fontsize=8.5, color=colour, fontweight="bold", va="top")
        fig.text(x + 0.03, y, text, fontsize=8.5, va="top", color="#222222")
        y -= 0.0215
    if more:
        fig.text(x + 0.03, y, f"… and {more} more in the record", fontsize=8.5, va="top",
                 style="italic", color="#555555")


def _checks_block(fig: Figure, record) -> None:
    checks = list(record.checks)
    rows = [("✓" if c.passed else "✗", VERDICT_COLOURS["PASS"] if c.passed
             else VERDICT_COLOURS["FAIL"], textwrap.shorten(f"{c.name}: {c.text}", 86,
                                                            placeholder="…"))
            for c in checks[:LIST_ROWS]]
    if not rows:
        rows = [("–", "#757575", "no checks: " + "; ".join(record.reasons or ("not judged",)))]
    _rows(fig, 0.02, "Acceptance checks", rows, max(0, len(checks) - LIST_ROWS))


def _events_block(fig: Figure, record, events) -> None:
    t0 = record.started_at
    rows = [(tag, colour, textwrap.shorten(f"{(t - t0) / 60.0:6.1f} min  {_clock(t)}  {text}", 84,
                                           placeholder="…"))
            for t, tag, colour, text in events[:LIST_ROWS]]
    if not rows:
        rows = [("–", "#757575", "no alarms and no operator actions during the batch")]
    _rows(fig, 0.51, "Alarms and operator actions", rows, max(0, len(events) - LIST_ROWS))


# --------------------------------------------------------------------------------------- HTML


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return "<p class=none>none</p>"
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _when(t_s: float) -> str:
    return f"{_day(t_s)} {_clock(t_s)}"


def page_html(record, png: bytes) -> str:
    """The HTML report: the picture (``png``, embedded) and the record's tables."""
    t0 = record.started_at
    colour = VERDICT_COLOURS.get(record.verdict, "#757575")
    summary = [("batch", record.batch_id), ("machine", record.machine_id),
               ("recipe", f"{record.recipe_id} ({(record.recipe or {}).get('name', '')})"),
               ("recipe sha256", record.recipe_hash), ("started", f"{_when(t0)} {_tz(t0)}"),
               ("ended", f"{_when(record.ended_at)} {_tz(t0)}"),
               ("duration", _duration(record.ended_at - t0)), ("started by", record.started_by),
               ("outcome", record.outcome + (f" (first out: {record.first_out})"
                                             if record.first_out else "")),
               ("energy", _energy(record)[len("energy "):])]
    f = lambda x: "" if x is None else f"{x:.2f}"     # noqa: E731
    parts = [
        f"<h1>Batch {html.escape(record.batch_id)} "
        f"<span class=verdict style='background:{colour}'>{html.escape(record.verdict)}</span></h1>",
        "".join(f"<p class=reason>{html.escape(r)}</p>" for r in record.reasons),
        f"<img alt='zone temperatures of batch {html.escape(record.batch_id)}' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
        "<h2>Summary</h2>", _table(("", ""), summary),
        "<h2>Acceptance checks</h2>",
        _table(("check", "result", "figure"),
               [(c.name, "pass" if c.passed else "FAIL", c.text) for c in record.checks]),
        "<h2>Phases</h2>",
        _table(("phase", "start", "end", "duration"),
               [(p.phase, _when(p.start), _when(p.end), _duration(p.duration_s))
                for p in record.phases]),
        "<h2>Zones by phase</h2>",
        _table(("phase", "zone", "samples", "min °C", "max °C", "mean °C", "std K",
                "outside tolerance s", "max deviation K"),
               [(z.phase, z.zone, z.samples, f(z.min_c), f(z.max_c), f(z.mean_c), f(z.std_c),
                 f"{z.outside_s:.0f}", f(z.max_dev_k)) for z in record.zones]),
        "<h2>Alarms</h2>",
        _table(("time", "min", "alarm", "priority", "message"),
               [(_when(a.time), f"{(a.time - t0) / 60:.1f}", a.alarm_id, a.priority, a.message)
                for a in record.alarms]),
        "<h2>Operator actions</h2>",
        _table(("time", "min", "user", "action", "detail"),
               [(_when(a.time), f"{(a.time - t0) / 60:.1f}", a.user, a.action, a.detail)
                for a in record.actions]),
        "<h2>Interruptions</h2>",
        _table(("start", "end", "gap s", "phase"),
               [(_when(i.start), _when(i.end), f"{i.gap_s:.0f}", i.phase)
                for i in record.interruptions]),
    ]
    style = ("body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:2em;color:#222}"
             "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em}"
             "th{background:#f3f3f3}.verdict{color:white;padding:.1em .5em;border-radius:.3em}"
             ".reason{color:" + colour + "}.none{color:#777}")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>Batch {html.escape(record.batch_id)}: {html.escape(record.verdict)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
