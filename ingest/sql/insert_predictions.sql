-- Idempotent: a content already recorded for this model version is skipped (and not returned).
INSERT INTO predictions (
    sha256, original_path, filename, size_bytes, label, confidence, topk, needs_review,
    model_name, model_version, run_id, received_at, status, error, error_code, original_path_bytes
) VALUES %s
ON CONFLICT (sha256, model_name, model_version) DO NOTHING
RETURNING id, sha256, model_version
