-- The current schema in one piece: what migrations 001..N add up to.
-- tests/test_ingest.py checks that applying the migrations in order gives exactly this.
-- When you add a migration, update this file to match.
CREATE TABLE ingest_runs (
    id            bigserial PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    status        text NOT NULL DEFAULT 'running',
    counts        jsonb NOT NULL DEFAULT '{}'::jsonb,
    host          text,
    error         text,
    pid           integer,
    settings      jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT ingest_runs_status_check
        CHECK (status IN ('running', 'succeeded', 'failed', 'stopped', 'interrupted'))
);
CREATE INDEX ingest_runs_started_at ON ingest_runs (started_at);

CREATE TABLE predictions (
    id             bigserial PRIMARY KEY,
    sha256         text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    original_path  text NOT NULL,
    filename       text NOT NULL,
    size_bytes     bigint NOT NULL CHECK (size_bytes >= 0),
    label          text,
    confidence     double precision CHECK (confidence BETWEEN 0 AND 1),
    topk           jsonb,
    needs_review   boolean,
    model_name     text NOT NULL,
    model_version  text NOT NULL,
    run_id         bigint REFERENCES ingest_runs (id),
    received_at    timestamptz NOT NULL,
    predicted_at   timestamptz NOT NULL DEFAULT now(),
    status         text NOT NULL CHECK (status IN ('ok', 'rejected')),
    error          text,
    error_code     text,
    original_path_bytes bytea,  -- the exact bytes of original_path when it is not valid UTF-8
    CONSTRAINT predictions_once_per_model UNIQUE (sha256, model_name, model_version),
    CONSTRAINT predictions_ok_has_label CHECK (status <> 'ok' OR label IS NOT NULL)
);
CREATE INDEX predictions_predicted_at ON predictions (predicted_at);
CREATE INDEX predictions_label ON predictions (label);
CREATE INDEX predictions_review_queue ON predictions (predicted_at) WHERE needs_review;
CREATE INDEX predictions_failures ON predictions (error_code, predicted_at) WHERE status = 'rejected';
CREATE INDEX predictions_model_sha ON predictions (model_name, sha256);

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
    source_path_bytes bytea,  -- the exact bytes of source_path / dest_path when not valid UTF-8
    dest_path_bytes   bytea,
    CONSTRAINT ingest_files_once_per_run UNIQUE (run_id, source_path)
);
CREATE INDEX ingest_files_pending ON ingest_files (id) WHERE state = 'pending';
CREATE INDEX ingest_files_run ON ingest_files (run_id);
CREATE INDEX ingest_files_prediction ON ingest_files (prediction_id);
