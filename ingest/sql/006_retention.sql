-- 006: retention. `python -m ingest prune` removes old photos from processed/ and quarantine/ and
-- keeps every row: ingest_files.pruned_at says when the file at dest_path was removed. `review
-- export` stamps the decisions it wrote (review_decisions.exported_at): a photo whose current
-- decision was never exported is kept, as is one whose review item is open.
ALTER TABLE ingest_files ADD COLUMN pruned_at timestamptz;
CREATE INDEX ingest_files_prunable ON ingest_files (moved_at) WHERE state = 'moved' AND pruned_at IS NULL;
ALTER TABLE review_decisions ADD COLUMN exported_at timestamptz;
