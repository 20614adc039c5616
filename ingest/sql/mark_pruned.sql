UPDATE ingest_files
SET pruned_at = now(), note = coalesce(note || '; ', '') || %(note)s
WHERE id = ANY(%(ids)s) AND pruned_at IS NULL
