-- Claim the next item nobody holds (or whose lease ran out) that waits for this reviewer: a first
-- decision, or a second or third opinion on an item they have neither decided nor given an opinion
-- on. The oldest first, or with order 'uncertain' the least confident answer first (the oldest
-- among equals). SKIP LOCKED: a concurrent claimer passes over the row another is taking; FOR
-- UPDATE re-checks the lease on the row it locks, so a row claimed and committed meanwhile is not
-- taken twice. Only items whose photo has been moved to processed/ (the move is recorded after
-- the row) are offered.
WITH next AS (
    SELECT i.id FROM review_items i
    JOIN predictions p ON p.id = i.prediction_id
    WHERE i.stage <> 'settled'
      AND (i.lease_until IS NULL OR i.lease_until <= now())
      AND EXISTS (SELECT 1 FROM ingest_files f
                  WHERE f.prediction_id = i.prediction_id AND f.destination = 'processed' AND f.state = 'moved')
      AND (i.stage = 'first' OR (
           NOT EXISTS (SELECT 1 FROM review_decisions d WHERE d.item_id = i.id AND d.reviewer_id = %(reviewer_id)s)
           AND NOT EXISTS (SELECT 1 FROM review_opinions o WHERE o.item_id = i.id AND o.reviewer_id = %(reviewer_id)s)))
    ORDER BY CASE WHEN %(order)s = 'uncertain' THEN p.confidence END ASC NULLS LAST, i.received_at, i.id
    LIMIT 1
    FOR UPDATE OF i SKIP LOCKED
)
UPDATE review_items i
SET claimed_by = %(reviewer_id)s, claimed_at = now(), lease_until = now() + make_interval(secs => %(lease_s)s)
FROM next WHERE i.id = next.id
RETURNING i.id
