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


@pytest.mark.integration
def test_other_is_recorded_and_reported_as_its_own_outcome(database_url, tmp_path):
    """Answers of a model with the `other` output: recorded as they come (label "other"), shown in
    the report as a category of its own, and an unconfident one in the review queue like any other."""
    import hashlib

    from ingest import files
    from ingest.journal import Journal, answer_problem
    from ingest.outcomes import Item, Outcome
    from ingest.settings import Settings
    from ingest.store import Store

    def outcome(name: str, body: dict) -> Outcome:
        data = name.encode()
        entry = files.Entry(tmp_path / "inbox" / name, name, len(data), 0, 0)
        return Outcome(Item(entry, None, hashlib.sha256(data).hexdigest(), len(data), datetime.now(timezone.utc)),
                       body=body, ok=True)

    answer = {"confidence": 0.97, "topk": [{"label": "other", "p": 0.97}], "needs_review": False,
              "model": "refund_classifier", "version": "2"}
    sure = {**answer, "label": "other", "in_category": False}
    unsure = {**sure, "confidence": 0.4, "needs_review": True}
    shirt = {**answer, "label": "Tshirts", "in_category": True}
    assert answer_problem(True, sure) is None and answer_problem(True, unsure) is None
    journal = Journal(Store(database_url), Settings(inbox=tmp_path / "inbox", database_url=database_url))
    journal.start_run()
    written = journal.record([outcome("a.jpg", sure), outcome("b.jpg", unsure), outcome("c.jpg", shirt)])
    assert not written.left and {p.destination for p in written.plan} == {"processed"}
    data = report.collect(database_url, since=datetime(2000, 1, 1, tzinfo=timezone.utc), limit=10,
                          sections=["by_day", "review_queue"])
    by_day = {row[3]: tuple(row[4:6]) for row in data["by_day"]["rows"]}  # category -> (images, needs_review)
    assert by_day == {"other": (2, 1), "Tshirts": (1, 0)}
    assert [(row[2], row[3]) for row in data["review_queue"]["rows"]] == [("b.jpg", "other")]
