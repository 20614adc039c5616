-- Idempotent within a run, so a transaction retried after a lost COMMIT acknowledgement adds nothing.
INSERT INTO ingest_files (
    run_id, prediction_id, sha256, source_path, relative_path, dest_path, destination, duplicate,
    source_path_bytes, dest_path_bytes
) VALUES %s
ON CONFLICT (run_id, source_path) DO NOTHING
