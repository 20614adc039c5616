-- Decided photos to export, each under its current decision's id with its settled label (after a
-- second opinion, where it had one), with a file of the photo each (one retention has not removed)
-- and whether retention removed the photo's files. Photos still waiting for an opinion and those
-- without a majority come back flagged, to be counted as skipped, and so do photos of a catalogue
-- added as gold (a test split must never become training data); "photo unusable" is left out.
-- --since: items settled (or, still waiting, decided) at or after it.
SELECT d.id, i.settled_label AS label, d.decided_at, f.dest_path, f.dest_path_bytes,
       EXISTS (SELECT 1 FROM ingest_files g WHERE g.sha256 = i.sha256 AND g.pruned_at IS NOT NULL) AS pruned,
       i.stage <> 'settled' AS waiting, i.settled_how = 'no majority' AS no_majority,
       EXISTS (SELECT 1 FROM review_gold c WHERE c.sha256 = i.sha256 AND c.source = 'catalogue') AS catalogue
FROM review_items i
JOIN review_decisions d ON d.id = i.decision_id
LEFT JOIN LATERAL (
    SELECT f.dest_path, f.dest_path_bytes FROM ingest_files f
    WHERE f.sha256 = i.sha256 AND f.destination = 'processed' AND f.state = 'moved' AND f.pruned_at IS NULL
    ORDER BY (f.prediction_id = i.prediction_id) DESC, f.id LIMIT 1
) f ON true
WHERE (i.stage <> 'settled' OR i.settled_how = 'no majority' OR i.settled_outcome IN ('category', 'other'))
  AND coalesce(i.settled_at, d.decided_at) >= %(since)s
ORDER BY d.id
