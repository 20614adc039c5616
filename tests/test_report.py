"""Report writers, without a database."""
from __future__ import annotations

import csv
import io
from datetime import datetime, timezone

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
