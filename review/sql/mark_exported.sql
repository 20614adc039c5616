-- The decisions an export wrote: their photos may now be pruned (ingest prune).
UPDATE review_decisions SET exported_at = now() WHERE id = ANY(%(ids)s) AND exported_at IS NULL
