"""Reports: the writers (no database), and that reading never changes the schema."""
from __future__ import annotations

import csv
import io
import uuid
from datetime import datetime, timezone

import psycopg2
import pytest

from ingest import report


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted_as_text():
    data = {"latest": {"columns": ["original_name", "confidence", "received_at"], "rows": [
        ["=HYPERLINK(\"http://x\").jpg", 0.5, datetime(2026, 1, 2, tzinfo=timezone.utc)],
        ["+1.jpg", -0.25, None], ["-x.jpg", 1, None], ["@SUM(A1).jpg", 1, None], ["\tt.jpg", 1, None],
        ["plain.jpg", 1, None], ["a=b.jpg", 1, None],
    ]}}
    out = io.StringIO()
    report.write_csv(data, out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == ["original_name", "confidence", "received_at"]
    names = [r[0] for r in rows[1:]]
    assert names == ["'=HYPERLINK(\"http://x\").jpg", "'+1.jpg", "'-x.jpg", "'@SUM(A1).jpg", "'\tt.jpg", "plain.jpg", "a=b.jpg"]
    assert rows[2][1] == "-0.25", "numbers stay numbers"
    assert rows[1][2] == "2026-01-02T00:00:00+00:00" and rows[2][2] == ""


@pytest.fixture
def empty_database(pg_cluster):
    """A database no migration has touched."""
    name = f"empty_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(pg_cluster.url("postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    yield pg_cluster.url(name)
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.mark.integration
def test_report_never_changes_the_schema(empty_database, capsys):
    from ingest.__main__ import main

    assert main(["report", "--database-url", empty_database]) == 1
    assert "python -m ingest migrate" in capsys.readouterr().err
    with psycopg2.connect(empty_database) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        assert cur.fetchone() == (0,), "report created tables"
    assert main(["migrate", "--database-url", empty_database]) == 0
    assert "applied 001_" in capsys.readouterr().out
    assert main(["report", "--database-url", empty_database, "--format", "json"]) == 0
