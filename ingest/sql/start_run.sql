INSERT INTO ingest_runs (host, pid, settings)
VALUES (%(host)s, %(pid)s, %(settings)s)
RETURNING id
