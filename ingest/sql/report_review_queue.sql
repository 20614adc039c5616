-- The needs-review queue, oldest first, with where each file was moved.
SELECT p.id, p.predicted_at, p.filename, p.label, round(p.confidence::numeric, 3) AS confidence,
       p.model_version,
       (SELECT f.dest_path FROM ingest_files f WHERE f.prediction_id = p.id ORDER BY f.id LIMIT 1) AS file
FROM predictions p
WHERE p.needs_review AND p.predicted_at >= %(since)s
ORDER BY p.predicted_at, p.id
LIMIT %(limit)s
