-- This reviewer's answer on a gold item shown to them, scored against the known label.
UPDATE review_gold_answers a
SET answered_at = now(), outcome = %(outcome)s, label = %(label)s,
    correct = (g.outcome = %(outcome)s AND g.label IS NOT DISTINCT FROM %(label)s)
FROM review_gold g
WHERE g.sha256 = a.sha256 AND a.item_id = %(item_id)s AND a.reviewer_id = %(reviewer_id)s AND a.answered_at IS NULL
RETURNING a.id
