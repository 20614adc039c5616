UPDATE ingest_files
SET state = %(state)s, moved_at = CASE WHEN %(state)s = 'moved' THEN now() END, note = %(note)s
WHERE id = ANY(%(ids)s) AND state = 'pending'
