-- The item this reviewer already holds (a reload, or back after a refused POST): renew its lease.
-- A gold item shown to them and not yet answered comes first (it has no lease: it is theirs alone).
WITH gold AS (
    SELECT item_id FROM review_gold_answers
    WHERE reviewer_id = %(reviewer_id)s AND answered_at IS NULL
    ORDER BY shown_at LIMIT 1
), held AS (
    UPDATE review_items
    SET lease_until = now() + make_interval(secs => %(lease_s)s)
    WHERE NOT EXISTS (SELECT 1 FROM gold)
      AND id = (SELECT id FROM review_items
                WHERE claimed_by = %(reviewer_id)s AND stage <> 'settled' AND lease_until > now()
                ORDER BY claimed_at LIMIT 1)
    RETURNING id
)
SELECT item_id FROM gold UNION ALL SELECT id FROM held
