-- 008: reviewers whose quality is measured. Second opinions: a share of decided items goes to a
-- second reviewer, blind; a disagreement goes to a third; the item's settled label is what the
-- reports and the export read. Gold items: photos whose label is known, shown to a reviewer exactly
-- like any other item, whose answers measure each reviewer. Leads see the measures on a page.

ALTER TABLE review_settings
    ADD COLUMN gold_share double precision NOT NULL DEFAULT 0.02 CHECK (gold_share >= 0 AND gold_share <= 1),
    ADD COLUMN second_opinion_share double precision NOT NULL DEFAULT 0
        CHECK (second_opinion_share >= 0 AND second_opinion_share <= 1),
    ADD COLUMN second_opinion_audit boolean NOT NULL DEFAULT true;

ALTER TABLE reviewers ADD COLUMN lead boolean NOT NULL DEFAULT false;

-- stage: what the item waits for. first: a decision; second: a second opinion; third: a third
-- opinion (the first two differ); settled: nothing (settled_* say the label and how).
-- reason gold: a photo of known label added by `review gold`, in no queue of its own.
ALTER TABLE review_items DROP CONSTRAINT review_items_reason_check;
ALTER TABLE review_items ADD CONSTRAINT review_items_reason_check CHECK (reason IN ('needs_review', 'audit', 'gold'));
ALTER TABLE review_items
    ADD COLUMN stage text NOT NULL DEFAULT 'first' CHECK (stage IN ('first', 'second', 'third', 'settled')),
    ADD COLUMN second_opinion boolean NOT NULL DEFAULT false,  -- chosen when the item is first decided
    ADD COLUMN settled_outcome text CHECK (settled_outcome IN ('category', 'other', 'unusable')),
    ADD COLUMN settled_label text,
    ADD COLUMN settled_how text CHECK (settled_how IN ('one reviewer', 'agreement', 'majority', 'no majority', 'catalogue')),
    ADD COLUMN settled_at timestamptz;  -- when it last settled (what export --since and the report's --since read)
UPDATE review_items i SET stage = 'settled', settled_outcome = d.outcome, settled_label = d.label, settled_how = 'one reviewer',
    settled_at = i.decided_at
FROM review_decisions d WHERE d.id = i.decision_id;
CREATE INDEX review_items_waiting ON review_items (received_at, id) WHERE stage <> 'settled';
CREATE INDEX review_decisions_item ON review_decisions (item_id);

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
