-- 003: file names that are not valid UTF-8 (SMB/NFS shares write Latin-1 and other legacy bytes).
-- The text columns hold a display form (each undecodable byte as \xNN); these bytea columns hold
-- the name's exact bytes, and are NULL when the text already is the exact name.
ALTER TABLE predictions ADD COLUMN original_path_bytes bytea;
ALTER TABLE ingest_files ADD COLUMN source_path_bytes bytea;
ALTER TABLE ingest_files ADD COLUMN dest_path_bytes bytea;
