SELECT id, sha256, source_path, dest_path, destination
FROM ingest_files
WHERE state = 'pending'
ORDER BY id
