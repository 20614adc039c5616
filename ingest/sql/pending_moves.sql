-- Every move still pending, of any job on this database: recovery keeps those of its own inbox
-- and destinations (compared on the exact paths, which the *_bytes columns hold for odd names).
SELECT id, sha256, source_path, dest_path, destination, source_path_bytes, dest_path_bytes
FROM ingest_files
WHERE state = 'pending'
ORDER BY id
