-- What processed/ and quarantine/ hold, by the sizes recorded, and what retention removed.
SELECT f.destination AS folder,
       count(*) FILTER (WHERE f.pruned_at IS NULL) AS files,
       round(coalesce(sum(p.size_bytes) FILTER (WHERE f.pruned_at IS NULL), 0) / 1048576.0, 1) AS mib,
       count(*) FILTER (WHERE f.pruned_at IS NOT NULL) AS pruned_files,
       round(coalesce(sum(p.size_bytes) FILTER (WHERE f.pruned_at IS NOT NULL), 0) / 1048576.0, 1) AS pruned_mib,
       min(f.moved_at) FILTER (WHERE f.pruned_at IS NULL) AS oldest
FROM ingest_files f
JOIN predictions p ON p.id = f.prediction_id
WHERE f.state = 'moved'
GROUP BY f.destination
ORDER BY f.destination
