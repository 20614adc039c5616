-- Every row a content already has for the model, of any version: what an insert that conflicted
-- ran into (recorded by an earlier run the pinned-version precheck missed, or by this very
-- transaction before its COMMIT acknowledgement was lost).
SELECT id, sha256, model_version, run_id, original_path
FROM predictions
WHERE model_name = %(model)s
  AND sha256 = ANY(%(shas)s)
