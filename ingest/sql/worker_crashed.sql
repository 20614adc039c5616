-- A worker died holding these contents: in_flight + 1 each, and alone + %(alone)s.
INSERT INTO worker_crashes AS w (sha256, model_name, in_flight, alone, last_kind, last_run_id)
SELECT sha, %(model)s, 1, %(alone)s, %(kind)s, %(run_id)s FROM unnest(%(shas)s::text[]) AS sha
ON CONFLICT (sha256, model_name) DO UPDATE
SET in_flight = w.in_flight + 1, alone = w.alone + EXCLUDED.alone, last_kind = EXCLUDED.last_kind,
    last_at = now(), last_run_id = EXCLUDED.last_run_id
RETURNING sha256, in_flight, alone
