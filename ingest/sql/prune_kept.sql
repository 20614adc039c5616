-- Moved photos older than the retention that stay for their review: (items waiting or gold photos, decisions not exported).
SELECT
    count(*) FILTER (WHERE EXISTS (SELECT 1 FROM review_items i WHERE i.sha256 = f.sha256 AND i.stage <> 'settled')
                                   OR EXISTS (SELECT 1 FROM review_gold g WHERE g.sha256 = f.sha256)),
    count(*) FILTER (WHERE EXISTS (SELECT 1 FROM review_items i JOIN review_decisions d ON d.id = i.decision_id
                                   WHERE i.sha256 = f.sha256 AND i.settled_outcome IN ('category', 'other') AND d.exported_at IS NULL))
FROM ingest_files f
WHERE f.state = 'moved' AND f.pruned_at IS NULL
  AND f.moved_at < now() - make_interval(secs => %(older_than_s)s)
