-- Called while holding the ingest lock: any other run still 'running' died without finishing.
UPDATE ingest_runs
SET status = 'interrupted', finished_at = now(),
    error = coalesce(error, 'the run ended without recording its end (killed, or lost its database)')
WHERE status = 'running' AND id <> %(current)s
RETURNING id
