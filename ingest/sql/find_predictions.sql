-- The row each content already has for the model: of the pinned version, or (version NULL)
-- of any version, newest first. Used before asking TorchServe, and after an insert that conflicted.
SELECT DISTINCT ON (sha256) sha256, id, status, model_version, error_code, error
FROM predictions
WHERE model_name = %(model)s
  AND sha256 = ANY(%(shas)s)
  AND (%(version)s::text IS NULL OR model_version = %(version)s)
ORDER BY sha256, predicted_at DESC, id DESC
