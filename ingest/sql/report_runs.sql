-- One line per run: what it did and how fast.
SELECT id AS run, started_at, round(extract(epoch FROM finished_at - started_at)::numeric, 1) AS seconds,
       status, host,
       coalesce((counts->>'processed')::int, 0) AS processed,
       coalesce((counts->>'duplicates')::int, 0) AS duplicates,
       coalesce((counts->>'quarantined')::int, 0) AS quarantined,
       coalesce((counts->>'failed')::int, 0) AS failed,
       coalesce((counts->>'retried')::int, 0) AS retried,
       (counts->>'images_per_s')::numeric AS images_per_s,
       error
FROM ingest_runs
WHERE started_at >= %(since)s
ORDER BY id DESC
LIMIT %(limit)s
