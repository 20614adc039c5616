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
    pruned_at      timestamptz,  -- when `ingest prune` removed the file at dest_path (the row stays)
    CONSTRAINT ingest_files_once_per_run UNIQUE (run_id, source_path)
);
CREATE INDEX ingest_files_prunable ON ingest_files (moved_at) WHERE state = 'moved' AND pruned_at IS NULL;
CREATE INDEX ingest_files_pending ON ingest_files (id) WHERE state = 'pending';
CREATE INDEX ingest_files_run ON ingest_files (run_id);
CREATE INDEX ingest_files_prediction ON ingest_files (prediction_id);

-- The review desk (004): see 004_review.sql for why the claim lives on the item row.
CREATE TABLE reviewers (
    id             bigserial PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    active         boolean NOT NULL DEFAULT true,
    session_version integer NOT NULL DEFAULT 1,
    last_login_at  timestamptz,
    deactivated_at timestamptz,
    lead           boolean NOT NULL DEFAULT false
);

-- One row: the share of confidently accepted predictions that also enter the queue as audit items;
-- the share of what a reviewer is shown that is gold; which decided items get a second opinion.
CREATE TABLE review_settings (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    audit_share  double precision NOT NULL DEFAULT 0.02 CHECK (audit_share >= 0 AND audit_share <= 1),
    gold_share   double precision NOT NULL DEFAULT 0.02 CHECK (gold_share >= 0 AND gold_share <= 1),
    second_opinion_share double precision NOT NULL DEFAULT 0
        CHECK (second_opinion_share >= 0 AND second_opinion_share <= 1),
    second_opinion_audit boolean NOT NULL DEFAULT true
);
INSERT INTO review_settings DEFAULT VALUES;

CREATE TABLE review_items (
    id             bigserial PRIMARY KEY,
    sha256         text NOT NULL UNIQUE,
    prediction_id  bigint NOT NULL REFERENCES predictions (id),  -- the prediction that queued it (shown)
    reason         text NOT NULL,
    received_at    timestamptz NOT NULL,  -- of that prediction: the queue is served oldest first
    queued_at      timestamptz NOT NULL DEFAULT now(),
    claimed_by     bigint REFERENCES reviewers (id),
    claimed_at     timestamptz,
    lease_until    timestamptz,
    decision_id    bigint,  -- the current decision (REFERENCES review_decisions, added below)
    decided_at     timestamptz,
    -- first: waits for a decision; second / third: for a second / third opinion; settled: done
    stage          text NOT NULL DEFAULT 'first' CHECK (stage IN ('first', 'second', 'third', 'settled')),
    second_opinion boolean NOT NULL DEFAULT false,  -- chosen when the item is first decided
    settled_outcome text CHECK (settled_outcome IN ('category', 'other', 'unusable')),
    settled_label  text,
    settled_how    text CHECK (settled_how IN ('one reviewer', 'agreement', 'majority', 'no majority', 'catalogue')),
    settled_at     timestamptz,  -- when it last settled (what export --since and the report's --since read)
    -- gold: a photo of known label added by `review gold`, in no queue of its own
    CONSTRAINT review_items_reason_check CHECK (reason IN ('needs_review', 'audit', 'gold'))
);
CREATE INDEX review_items_open ON review_items (received_at, id) WHERE decision_id IS NULL;
CREATE INDEX review_items_waiting ON review_items (received_at, id) WHERE stage <> 'settled';

CREATE TABLE review_decisions (
    id              bigserial PRIMARY KEY,
    item_id         bigint NOT NULL REFERENCES review_items (id),
    sha256          text NOT NULL,
    reviewer_id     bigint NOT NULL REFERENCES reviewers (id),
    decided_at      timestamptz NOT NULL DEFAULT now(),
    -- category: one of the model's categories; other: not a refund category; unusable: photo unusable
    outcome         text NOT NULL CHECK (outcome IN ('category', 'other', 'unusable')),
    label           text,  -- the category, 'other', or NULL (unusable)
    previous_label  text,  -- the label this decision replaces: the model's answer, or the decision it changes
    supersedes      bigint UNIQUE REFERENCES review_decisions (id),  -- the decision it changes, if any
    exported_at     timestamptz,  -- when `review export` first wrote it
    CONSTRAINT review_decisions_label_matches_outcome CHECK (
        (outcome = 'unusable' AND label IS NULL) OR (outcome = 'other' AND label = 'other')
        OR (outcome = 'category' AND label IS NOT NULL AND label <> 'other'))
);
CREATE INDEX review_decisions_reviewer ON review_decisions (reviewer_id, decided_at);
CREATE INDEX review_decisions_sha ON review_decisions (sha256);
CREATE INDEX review_decisions_item ON review_decisions (item_id);
-- The photo of a content, whichever row moved it.
CREATE INDEX ingest_files_sha ON ingest_files (sha256);
ALTER TABLE review_items ADD CONSTRAINT review_items_decision_id_fkey
    FOREIGN KEY (decision_id) REFERENCES review_decisions (id);

-- Where a content falls in [0, 1): its first 32 bits. The audit sample is the contents below the
-- share, so it is the same on every database and every rerun.
CREATE FUNCTION review_audit_point(sha256 text) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT ('x' || substr(sha256, 1, 8))::bit(32)::bigint / 4294967296.0 $$;

-- Once per INSERT statement (the job inserts a batch a statement), over the rows it inserted:
-- cheaper than a row trigger. Within a statement a content that needs review wins over its audit.
CREATE FUNCTION review_enqueue() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO review_items (sha256, prediction_id, reason, received_at)
    SELECT DISTINCT ON (n.sha256) n.sha256, n.id, CASE WHEN n.needs_review THEN 'needs_review' ELSE 'audit' END, n.received_at
    FROM new_predictions n
    WHERE n.status = 'ok'
      AND (n.needs_review OR review_audit_point(n.sha256) < (SELECT audit_share FROM review_settings))
    ORDER BY n.sha256, n.needs_review DESC, n.id
    ON CONFLICT (sha256) DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER predictions_review_enqueue AFTER INSERT ON predictions
    REFERENCING NEW TABLE AS new_predictions
    FOR EACH STATEMENT EXECUTE FUNCTION review_enqueue();

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

CREATE TABLE review_sessions (
    token_sha256     text PRIMARY KEY,
    reviewer_id      bigint NOT NULL REFERENCES reviewers (id),
    session_version  integer NOT NULL,
    address          text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    ended_at         timestamptz
);
CREATE INDEX review_sessions_open ON review_sessions (reviewer_id) WHERE ended_at IS NULL;

-- The blind opinions after the first decision: round 2 (second reviewer), round 3 (third).
CREATE TABLE review_opinions (
    id           bigserial PRIMARY KEY,
    item_id      bigint NOT NULL REFERENCES review_items (id),
    round        smallint NOT NULL CHECK (round IN (2, 3)),
    reviewer_id  bigint NOT NULL REFERENCES reviewers (id),
    decided_at   timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL CHECK (outcome IN ('category', 'other', 'unusable')),
    label        text,
    CONSTRAINT review_opinions_label_matches_outcome CHECK (
        (outcome = 'unusable' AND label IS NULL) OR (outcome = 'other' AND label = 'other')
        OR (outcome = 'category' AND label IS NOT NULL AND label <> 'other')),
    UNIQUE (item_id, round),
    UNIQUE (item_id, reviewer_id)
);
CREATE INDEX review_opinions_reviewer ON review_opinions (reviewer_id, decided_at);

-- Photos of known label: from a catalogue (`review gold DIR`) or decisions a second reviewer
-- confirmed blind (settled by agreement). Never "photo unusable".
CREATE TABLE review_gold (
    sha256    text PRIMARY KEY,
    outcome   text NOT NULL CHECK (outcome IN ('category', 'other')),
    label     text NOT NULL,
    source    text NOT NULL CHECK (source IN ('catalogue', 'agreement')),
    added_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((outcome = 'other') = (label = 'other'))
);

-- A gold item shown to a reviewer (answered_at NULL: held by them now) and their answer.
CREATE TABLE review_gold_answers (
    id           bigserial PRIMARY KEY,
    sha256       text NOT NULL REFERENCES review_gold (sha256),
    item_id      bigint NOT NULL REFERENCES review_items (id),
    reviewer_id  bigint NOT NULL REFERENCES reviewers (id),
    shown_at     timestamptz NOT NULL DEFAULT now(),
    answered_at  timestamptz,
    outcome      text CHECK (outcome IN ('category', 'other', 'unusable')),
    label        text,
    correct      boolean,
    UNIQUE (sha256, reviewer_id),
    CHECK ((answered_at IS NULL) = (outcome IS NULL) AND (answered_at IS NULL) = (correct IS NULL))
);
CREATE INDEX review_gold_answers_reviewer ON review_gold_answers (reviewer_id, answered_at);

-- Items whose page a reviewer was shown with their answers (or, for a photo of known label, outside
-- a gold turn): never shown to that reviewer as gold.
CREATE TABLE review_item_views (
    reviewer_id  bigint NOT NULL REFERENCES reviewers (id),
    item_id      bigint NOT NULL REFERENCES review_items (id),
    viewed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reviewer_id, item_id)
);

-- Where an item stands, from its rows: called after every decision, opinion or undo on it. When
-- the stage changes the claim ends, so the next round's reviewer can take the item at once.
CREATE FUNCTION review_settle(item bigint) RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    it review_items;
    d review_decisions;
    o2 review_opinions;
    o3 review_opinions;
    new_stage text;
    how text;
    s_outcome text;
    s_label text;
BEGIN
    SELECT * INTO it FROM review_items WHERE id = item;
    IF it.reason = 'gold' THEN
        RETURN it.stage;
    END IF;
    SELECT * INTO d FROM review_decisions WHERE id = it.decision_id;
    SELECT * INTO o2 FROM review_opinions WHERE item_id = item AND round = 2;
    SELECT * INTO o3 FROM review_opinions WHERE item_id = item AND round = 3;
    IF it.decision_id IS NULL THEN
        new_stage := 'first';
    ELSIF NOT it.second_opinion THEN
        new_stage := 'settled'; how := 'one reviewer'; s_outcome := d.outcome; s_label := d.label;
    ELSIF o2.id IS NULL THEN
        new_stage := 'second';
    ELSIF o2.outcome = d.outcome AND o2.label IS NOT DISTINCT FROM d.label THEN
        new_stage := 'settled'; how := 'agreement'; s_outcome := d.outcome; s_label := d.label;
    ELSIF o3.id IS NULL THEN
        new_stage := 'third';
    ELSIF (o3.outcome = d.outcome AND o3.label IS NOT DISTINCT FROM d.label)
       OR (o3.outcome = o2.outcome AND o3.label IS NOT DISTINCT FROM o2.label) THEN
        new_stage := 'settled'; how := 'majority'; s_outcome := o3.outcome; s_label := o3.label;
    ELSE
        new_stage := 'settled'; how := 'no majority';
    END IF;
    UPDATE review_items
    SET stage = new_stage, settled_how = how, settled_outcome = s_outcome, settled_label = s_label,
        settled_at = CASE WHEN new_stage = 'settled' THEN now() END,
        claimed_by = CASE WHEN new_stage = it.stage THEN claimed_by END,
        claimed_at = CASE WHEN new_stage = it.stage THEN claimed_at END,
        lease_until = CASE WHEN new_stage = it.stage THEN lease_until END
    WHERE id = item;
    IF how = 'agreement' AND s_outcome <> 'unusable' THEN
        INSERT INTO review_gold (sha256, outcome, label, source)
        VALUES (it.sha256, s_outcome, s_label, 'agreement')
        ON CONFLICT (sha256) DO NOTHING;
    END IF;
    RETURN new_stage;
END
$$;

-- The Wilson score interval at 95 percent (z = 1.96) of k successes in n > 0 trials, its low end
-- (side -1) or high end (side +1): it stays inside [0, 1] for small samples.
CREATE FUNCTION review_wilson(k double precision, n double precision, side integer) RETURNS numeric
    LANGUAGE sql IMMUTABLE STRICT
    AS $$ SELECT round(((k / n + 1.96 ^ 2 / (2 * n) + side * 1.96 * sqrt(k / n * (1 - k / n) / n + 1.96 ^ 2 / (4 * n * n)))
                        / (1 + 1.96 ^ 2 / n))::numeric, 3) $$;
