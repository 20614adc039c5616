SELECT id, host, pid, started_at
FROM ingest_runs
WHERE status = 'running'
ORDER BY id DESC
LIMIT 1
