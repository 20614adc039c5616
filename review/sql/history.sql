-- A reviewer's decisions, newest first, whether each is still the current one for its item.
SELECT d.id, d.item_id, d.decided_at, d.outcome, d.label, d.previous_label, i.reason,
       p.label AS model_label, p.model_version, (i.decision_id = d.id) AS current
FROM review_decisions d
JOIN review_items i ON i.id = d.item_id
JOIN predictions p ON p.id = i.prediction_id
WHERE d.reviewer_id = %(reviewer_id)s
ORDER BY d.decided_at DESC, d.id DESC
LIMIT %(limit)s
