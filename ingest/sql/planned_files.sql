-- The ids of the moves this run planned for these source paths (insert_files does not return
-- the rows it skipped as already there).
SELECT source_path, id
FROM ingest_files
WHERE run_id = %(run_id)s
  AND source_path = ANY(%(sources)s)
