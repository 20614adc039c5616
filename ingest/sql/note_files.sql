-- A pending move that could not be finished now: say why, and leave it pending for the next run.
UPDATE ingest_files
SET note = %(note)s
WHERE id = ANY(%(ids)s) AND state = 'pending'
