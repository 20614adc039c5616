UPDATE ingest_runs
SET finished_at = now(), status = %(status)s, counts = %(counts)s, error = %(error)s
WHERE id = %(id)s
