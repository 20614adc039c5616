-- 002: a journal of file moves (crash recovery, duplicates), error codes, run bookkeeping.

-- Every file the job takes out of the inbox: which row it belongs to and where it goes.
-- Written in the same transaction as its prediction row, *before* the file is moved;
-- a row still 'pending' at the next start is a move a crash interrupted, and is finished then.
CREATE TABLE ingest_files (
    id             bigserial PRIMARY KEY,
    run_id         bigint NOT NULL REFERENCES ingest_runs (id),
    prediction_id  bigint NOT NULL REFERENCES predictions (id),
    sha256         text NOT NULL,
    source_path    text NOT NULL,
    relative_path  text NOT NULL,
    dest_path      text NOT NULL,
    destination    text NOT NULL CHECK (destination IN ('processed', 'quarantine')),
    duplicate      boolean NOT NULL DEFAULT false,
    state          text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'moved', 'missing', 'superseded')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    moved_at       timestamptz,
    note           text,
    CONSTRAINT ingest_files_once_per_run UNIQUE (run_id, source_path)
);
CREATE INDEX ingest_files_pending ON ingest_files (id) WHERE state = 'pending';
CREATE INDEX ingest_files_run ON ingest_files (run_id);
CREATE INDEX ingest_files_prediction ON ingest_files (prediction_id);

ALTER TABLE predictions ADD COLUMN error_code text;
UPDATE predictions SET error_code = split_part(error, ':', 1) WHERE status = 'rejected';
CREATE INDEX predictions_failures ON predictions (error_code, predicted_at) WHERE status = 'rejected';
CREATE INDEX predictions_model_sha ON predictions (model_name, sha256);

ALTER TABLE ingest_runs DROP CONSTRAINT ingest_runs_status_check;
ALTER TABLE ingest_runs ADD CONSTRAINT ingest_runs_status_check
    CHECK (status IN ('running', 'succeeded', 'failed', 'stopped', 'interrupted'));
ALTER TABLE ingest_runs ADD COLUMN pid integer;
ALTER TABLE ingest_runs ADD COLUMN settings jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX ingest_runs_started_at ON ingest_runs (started_at);
