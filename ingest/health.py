"""python -m ingest health: one line per problem and exit 1, for an alert; and the same figures in the
Prometheus text format, so that one set of alert rules serves one box and Kubernetes alike.

Checked against PostgreSQL (every runner of every inbox records its runs there) and, with --inbox,
the inbox itself:
  * no successful run for longer than --no-success-for;
  * photos waiting in the inbox longer than --waiting-for (the job would have taken them);
  * moves pending for longer than --pending-for (a run recorded a photo and could not move it);
  * quarantine growing faster than --quarantine-share of what was recorded in --window.

Where the figures go: --textfile FILE writes them for node_exporter's textfile collector (written to
a temporary name and renamed into place, as the collector requires); --pushgateway URL pushes them to
a Prometheus Pushgateway, for a cluster where the job's pod is gone before anything could scrape it.
The metric names are the same either way.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ingest import db, files

PREFIX = "refund_ingest"


@dataclass(frozen=True)
class Limits:
    no_success_for: float = 3600.0
    waiting_for: float = 3600.0
    pending_for: float = 900.0
    quarantine_share: float = 0.2
    window: float = 86400.0
    min_recorded: int = 20  # fewer photos than this in the window: no quarantine share judged


@dataclass
class Health:
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # name (with labels) -> value
    help: dict[str, str] = field(default_factory=dict)

    def gauge(self, name: str, value: float | None, help_text: str, labels: str = "") -> None:
        if value is None:
            return
        self.help[name] = help_text
        self.metrics[f"{PREFIX}_{name}{labels}"] = float(value)


def inbox_waiting(inbox: Path, exclude: tuple[Path, ...], now: float) -> tuple[int, float | None]:
    """(photos in the inbox of the kinds the job takes, the oldest one's age in seconds)."""
    count, oldest = 0, None
    for found in files.walk(inbox, exclude=exclude):
        if isinstance(found, files.Entry):
            count += 1
            age = now - found.mtime_ns / 1e9
            oldest = age if oldest is None else max(oldest, age)
    return count, oldest


def check(database_url: str, limits: Limits, *, inbox: Path | None = None, exclude: tuple[Path, ...] = (),
          now: float | None = None) -> Health:
    """The problems and figures; inbox: also look at its photos (exclude: processed/ and quarantine/
    where they lie inside it)."""
    now = time.time() if now is None else now
    h = Health()
    with db.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(db.load_query("health"), {"pending_s": limits.pending_for, "window_s": limits.window})
        since_success, since_any, last_status, counts, pending, recorded, quarantined = cur.fetchone()
    since_success = None if since_success is None else float(since_success)
    if since_success is None:
        h.problems.append("no successful ingest run recorded yet" if since_any is None else
                          f"no successful ingest run yet (the last run, {float(since_any) / 60:.0f} min ago, was {last_status})")
    elif since_success > limits.no_success_for:
        h.problems.append(f"no successful ingest run for {since_success / 3600:.1f} h (last run: {last_status}; "
                          f"limit --no-success-for {limits.no_success_for / 3600:g} h)")
    if pending:
        h.problems.append(f"{pending} moves pending for longer than {limits.pending_for / 60:g} min: recorded photos the job "
                          f"could not move (ingest_files.note says why; `ingest report` lists the runs)")
    share = quarantined / recorded if recorded else 0.0
    if recorded >= limits.min_recorded and share > limits.quarantine_share:
        h.problems.append(f"{quarantined} of {recorded} photos recorded in the last {limits.window / 3600:g} h were "
                          f"quarantined ({share:.0%}, limit {limits.quarantine_share:.0%})")
    h.gauge("seconds_since_success", since_success, "Seconds since the last ingest run that succeeded.")
    h.gauge("pending_moves", pending, "Recorded photos whose move has been pending longer than --pending-for.")
    h.gauge("recorded_in_window", recorded, "Photos recorded within --window.")
    h.gauge("quarantined_in_window", quarantined, "Photos quarantined within --window.")
    for key in ("processed", "duplicates", "quarantined", "failed", "retried", "worker_died", "move_failed",
                "recovery_failed", "waited_too_long"):
        h.gauge("last_run_photos", (counts or {}).get(key, 0) if counts is not None else None,
                "What the last finished run counted, by outcome.", f'{{outcome="{key}"}}')
    if counts is not None:
        h.gauge("last_run_seconds", counts.get("elapsed_s"), "How long the last finished run took.")
    if inbox is not None:
        waiting, oldest = inbox_waiting(inbox, exclude, now)
        h.gauge("inbox_photos", waiting, "Photos in the inbox (of the kinds the job takes).")
        h.gauge("inbox_oldest_seconds", oldest or 0.0, "Age of the oldest photo in the inbox (by its modification time).")
        if oldest is not None and oldest > limits.waiting_for:
            h.problems.append(f"photos have waited in the inbox {inbox} for {oldest / 3600:.1f} h (limit --waiting-for "
                              f"{limits.waiting_for / 3600:g} h): {waiting} there now")
    h.gauge("problems", len(h.problems), "Problems `python -m ingest health` found (0: healthy).")
    return h


def exposition(h: Health) -> str:
    """The Prometheus text format (version 0.0.4)."""
    lines, described = [], set()
    for key in sorted(h.metrics):
        name = key.split("{")[0]
        if name not in described:
            short = name[len(PREFIX) + 1:]
            lines += [f"# HELP {name} {h.help[short]}", f"# TYPE {name} gauge"]
            described.add(name)
        lines.append(f"{key} {h.metrics[key]:.17g}")
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Write, then rename into place: node_exporter never reads half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def push(url: str, text: str, *, job: str = PREFIX, timeout: float = 10.0) -> None:
    """PUT the figures to a Pushgateway under job=`job` (replacing that group's earlier ones)."""
    import requests

    response = requests.put(f"{url.rstrip('/')}/metrics/job/{job}", data=text.encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4"}, timeout=timeout)
    response.raise_for_status()
