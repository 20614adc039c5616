-- Moved photos older than the retention whose file may go: no review item waiting for the content
-- (a decision or an opinion), not a gold photo (reviewers are shown it), and not a photo whose
-- settled label was never exported ("photo unusable" and "no majority" are never exported).
SELECT f.id, f.sha256, f.destination, f.dest_path, f.dest_path_bytes, p.size_bytes
FROM ingest_files f
JOIN predictions p ON p.id = f.prediction_id
WHERE f.state = 'moved' AND f.pruned_at IS NULL
  AND f.moved_at < now() - make_interval(secs => %(older_than_s)s)
  AND NOT EXISTS (SELECT 1 FROM review_items i WHERE i.sha256 = f.sha256 AND i.stage <> 'settled')
  AND NOT EXISTS (SELECT 1 FROM review_gold g WHERE g.sha256 = f.sha256)
  AND NOT EXISTS (SELECT 1 FROM review_items i JOIN review_decisions d ON d.id = i.decision_id
                  WHERE i.sha256 = f.sha256 AND i.settled_outcome IN ('category', 'other') AND d.exported_at IS NULL)
  AND f.id > %(after)s
ORDER BY f.id
LIMIT %(limit)s
