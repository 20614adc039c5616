-- 005: photos a TorchServe worker died on, per content and model (ingest.crashes).
--
-- in_flight: how often the content was in a request whose worker died ("Worker died.": crashed, or
-- killed for not answering within responseTimeout); alone: how often it was the only photo TorchServe
-- held when its worker died, with a plain test image going through right after. At two `alone` the
-- job records a `rejected` row (error code worker_crash or worker_timeout) and quarantines the file.
CREATE TABLE worker_crashes (
    sha256       text NOT NULL,
    model_name   text NOT NULL,
    in_flight    integer NOT NULL DEFAULT 0,
    alone        integer NOT NULL DEFAULT 0,
    last_kind    text NOT NULL CHECK (last_kind IN ('worker_crash', 'worker_timeout')),
    first_at     timestamptz NOT NULL DEFAULT now(),
    last_at      timestamptz NOT NULL DEFAULT now(),
    last_run_id  bigint REFERENCES ingest_runs (id),
    PRIMARY KEY (sha256, model_name)
);
