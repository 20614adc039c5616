-- One line per run: what it did, how fast, and what it left for later or for a person.
SELECT r.id AS run, r.started_at, round(extract(epoch FROM r.finished_at - r.started_at)::numeric, 1) AS seconds,
       r.status, r.host,
       coalesce((r.counts->>'processed')::int, 0) AS processed,
       coalesce((r.counts->>'duplicates')::int, 0) AS duplicates,
       coalesce((r.counts->>'quarantined')::int, 0) AS quarantined,
       coalesce((r.counts->>'failed')::int, 0) AS failed,
       coalesce((r.counts->>'retried')::int, 0) AS retried,
       coalesce((r.counts->>'worker_died')::int, 0) AS worker_died,
       coalesce((r.counts->>'move_failed')::int, 0) AS move_failed,
       coalesce((r.counts->>'recovery_failed')::int, 0) AS recovery_failed,
       (SELECT count(*) FROM ingest_files f WHERE f.run_id = r.id AND f.state = 'pending') AS pending_moves,
       (SELECT string_agg(key || ' ' || value, ', ' ORDER BY key)
        FROM jsonb_each_text(coalesce(r.counts->'skipped', '{}'::jsonb))) AS skipped,
       coalesce((r.counts->>'waited_too_long')::int, 0) AS waited_too_long,
       (SELECT string_agg(name, ', ')
        FROM jsonb_array_elements_text(coalesce(r.counts->'waited_too_long_names', '[]'::jsonb)) AS name) AS waited_too_long_names,
       (r.counts->>'images_per_s')::numeric AS images_per_s,
       r.error
FROM ingest_runs r
WHERE r.started_at >= %(since)s
ORDER BY r.id DESC
LIMIT %(limit)s
