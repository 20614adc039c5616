-- 001: predictions and ingestion runs.
CREATE TABLE ingest_runs (
    id            bigserial PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    status        text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    counts        jsonb NOT NULL DEFAULT '{}'::jsonb,
    host          text,
    error         text
);

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
    CONSTRAINT predictions_once_per_model UNIQUE (sha256, model_name, model_version),
    CONSTRAINT predictions_ok_has_label CHECK (status <> 'ok' OR label IS NOT NULL)
);

CREATE INDEX predictions_predicted_at ON predictions (predicted_at);
CREATE INDEX predictions_label ON predictions (label);
CREATE INDEX predictions_review_queue ON predictions (predicted_at) WHERE needs_review;
