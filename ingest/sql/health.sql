-- What `python -m ingest health` checks, in one row (times as seconds ago; NULL: never).
SELECT
    (SELECT extract(epoch FROM now() - max(finished_at)) FROM ingest_runs WHERE status = 'succeeded') AS since_success_s,
    (SELECT extract(epoch FROM now() - max(started_at)) FROM ingest_runs) AS since_any_run_s,
    (SELECT status FROM ingest_runs ORDER BY id DESC LIMIT 1) AS last_status,
    (SELECT counts FROM ingest_runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1) AS last_counts,
    (SELECT count(*) FROM ingest_files WHERE state = 'pending' AND created_at < now() - make_interval(secs => %(pending_s)s))
        AS pending_moves,
    (SELECT count(*) FROM predictions WHERE predicted_at >= now() - make_interval(secs => %(window_s)s)) AS recorded,
    (SELECT count(*) FROM predictions WHERE predicted_at >= now() - make_interval(secs => %(window_s)s)
        AND status = 'rejected') AS quarantined
