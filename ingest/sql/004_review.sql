-- 004: the review desk (python -m review): reviewers, the review queue, claims and decisions.
--
-- One review item per photo content (sha256): a decision covers every prediction row of that
-- content, whatever model version made it. An item is queued, in the same transaction as the
-- prediction row that asks for it (trigger below), when that prediction needs review, or when it
-- was accepted confidently and its content falls in the audit sample.
--
-- The claim (lease) lives on the item row itself, not in a table beside it: a claimer takes the
-- row with SELECT ... FOR UPDATE SKIP LOCKED and updates it, so a second claimer that waited on
-- or raced past the same row sees the new lease when PostgreSQL re-checks the row it locks.

CREATE TABLE reviewers (
    id             bigserial PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    active         boolean NOT NULL DEFAULT true
);

-- One row: the share of confidently accepted predictions that also enter the queue as audit items.
CREATE TABLE review_settings (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    audit_share  double precision NOT NULL DEFAULT 0.02 CHECK (audit_share >= 0 AND audit_share <= 1)
);
INSERT INTO review_settings DEFAULT VALUES;

CREATE TABLE review_items (
    id             bigserial PRIMARY KEY,
    sha256         text NOT NULL UNIQUE,
    prediction_id  bigint NOT NULL REFERENCES predictions (id),  -- the prediction that queued it (shown)
    reason         text NOT NULL CHECK (reason IN ('needs_review', 'audit')),
    received_at    timestamptz NOT NULL,  -- of that prediction: the queue is served oldest first
    queued_at      timestamptz NOT NULL DEFAULT now(),
    claimed_by     bigint REFERENCES reviewers (id),
    claimed_at     timestamptz,
    lease_until    timestamptz,
    decision_id    bigint,  -- the current decision (REFERENCES review_decisions, added below)
    decided_at     timestamptz
);
CREATE INDEX review_items_open ON review_items (received_at, id) WHERE decision_id IS NULL;

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
    CONSTRAINT review_decisions_label_matches_outcome CHECK (
        (outcome = 'unusable' AND label IS NULL) OR (outcome = 'other' AND label = 'other')
        OR (outcome = 'category' AND label IS NOT NULL AND label <> 'other'))
);
CREATE INDEX review_decisions_reviewer ON review_decisions (reviewer_id, decided_at);
CREATE INDEX review_decisions_sha ON review_decisions (sha256);
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

-- What was recorded before this migration enters the queue by the same rule (oldest prediction of a content).
INSERT INTO review_items (sha256, prediction_id, reason, received_at)
SELECT DISTINCT ON (p.sha256) p.sha256, p.id, CASE WHEN p.needs_review THEN 'needs_review' ELSE 'audit' END, p.received_at
FROM predictions p
WHERE p.status = 'ok' AND (p.needs_review OR review_audit_point(p.sha256) < (SELECT audit_share FROM review_settings))
ORDER BY p.sha256, p.needs_review DESC, p.received_at, p.id
ON CONFLICT (sha256) DO NOTHING;
