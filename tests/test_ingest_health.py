"""`python -m ingest health` against a real PostgreSQL: one line per problem and exit 1, exit 0 when
there is none, and the same figures in the Prometheus text format for node_exporter's textfile
collector."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

from serving.paths import REPO_ROOT

pytestmark = pytest.mark.integration


def health(database_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ingest", "health", "--database-url", database_url, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def execute(url: str, sql: str, params: dict | None = None) -> list[tuple]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql, params or {})
        return cur.fetchall() if cur.description else []


def add_run(url: str, *, status: str, finished_ago_s: float, counts: str = '{"processed": 3, "quarantined": 1}') -> int:
    return execute(url, """INSERT INTO ingest_runs (started_at, finished_at, status, counts)
                           VALUES (now() - make_interval(secs => %(ago)s + 5), now() - make_interval(secs => %(ago)s),
                                   %(status)s, %(counts)s::jsonb) RETURNING id""",
                   {"ago": finished_ago_s, "status": status, "counts": counts})[0][0]


def add_predictions(url: str, run_id: int, ok: int, rejected: int) -> list[int]:
    rows = [("ok" if i < ok else "rejected", f"{i:064x}") for i in range(ok + rejected)]
    return [execute(url, """INSERT INTO predictions (sha256, original_path, filename, size_bytes, label, model_name,
                              model_version, run_id, received_at, status, error_code)
                            VALUES (%(sha)s, 'p.jpg', 'p.jpg', 1, CASE WHEN %(st)s = 'ok' THEN 'Tshirts' END, 'm', '1',
                                    %(run)s, now(), %(st)s, CASE WHEN %(st)s = 'rejected' THEN 'corrupt' END) RETURNING id""",
                    {"sha": sha, "st": st, "run": run_id})[0][0] for st, sha in rows]


def metrics_of(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_health_names_each_problem_and_exports_the_figures(database_url, tmp_path):
    got = health(database_url)
    assert got.returncode == 1 and "no successful ingest run recorded yet" in got.stdout, got.stdout + got.stderr

    run_id = add_run(database_url, status="succeeded", finished_ago_s=60)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "fresh.jpg").write_bytes(b"x")
    prom = tmp_path / "refund_ingest.prom"
    got = health(database_url, "--inbox", str(inbox), "--textfile", str(prom))
    assert (got.returncode, got.stdout.strip()) == (0, "ingest health: ok"), got.stdout + got.stderr
    figures = metrics_of(prom)
    assert figures["refund_ingest_problems"] == 0 and figures["refund_ingest_inbox_photos"] == 1
    assert 55 < figures["refund_ingest_seconds_since_success"] < 600
    assert figures['refund_ingest_last_run_photos{outcome="processed"}'] == 3
    assert "# TYPE refund_ingest_problems gauge" in prom.read_text()

    # three problems at once: an old photo in the inbox, a move pending for an hour, a quarantine share of 40 %
    stale = inbox / "stale.jpg"
    stale.write_bytes(b"y")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    ids = add_predictions(database_url, run_id, ok=18, rejected=12)
    execute(database_url, """INSERT INTO ingest_files (run_id, prediction_id, sha256, source_path, relative_path, dest_path,
                                                       destination, created_at)
                             VALUES (%(run)s, %(pid)s, %(sha)s, '/in/a.jpg', 'a.jpg', '/out/a.jpg', 'processed',
                                     now() - interval '1 hour')""", {"run": run_id, "pid": ids[0], "sha": f"{0:064x}"})
    got = health(database_url, "--inbox", str(inbox), "--textfile", str(prom))
    assert got.returncode == 1, got.stdout + got.stderr
    lines = got.stdout.strip().splitlines()
    assert len(lines) == 3, lines
    assert any("1 moves pending for longer than 15 min" in line for line in lines)
    assert any("12 of 30 photos recorded in the last 24 h were quarantined (40%" in line for line in lines)
    assert any("waited in the inbox" in line and "2 there now" in line for line in lines)
    figures = metrics_of(prom)
    assert figures["refund_ingest_problems"] == 3 and figures["refund_ingest_pending_moves"] == 1
    assert figures["refund_ingest_inbox_oldest_seconds"] > 7000

    # a last success longer ago than --no-success-for
    execute(database_url, "UPDATE ingest_runs SET finished_at = now() - interval '3 hours'")
    add_run(database_url, status="failed", finished_ago_s=30)
    got = health(database_url, "--quarantine-share", "0.5", "--pending-for", "2h")
    assert got.returncode == 1 and got.stdout.strip().splitlines() == [
        "ingest health: no successful ingest run for 3.0 h (last run: failed; limit --no-success-for 1 h)"], got.stdout


def test_health_exits_4_when_postgresql_cannot_be_asked(tmp_path):
    got = health("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert got.returncode == 4 and "PostgreSQL unavailable" in got.stdout, got.stdout + got.stderr
