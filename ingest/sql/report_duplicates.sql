-- Files that arrived with content already recorded (for this model), and the row they share.
SELECT f.created_at, f.relative_path, f.dest_path, f.prediction_id, p.original_path AS first_recorded_as
FROM ingest_files f JOIN predictions p ON p.id = f.prediction_id
WHERE f.duplicate AND f.created_at >= %(since)s
ORDER BY f.id DESC
LIMIT %(limit)s
