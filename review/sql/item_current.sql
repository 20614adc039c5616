-- A locked item's state: its claim and its current decision (who, what, when).
SELECT i.id, i.sha256, i.claimed_by, i.lease_until > now() AS leased, i.decision_id,
       p.label AS model_label, d.label AS decided_label, d.outcome AS decided_outcome,
       d.reviewer_id AS decided_by_id, r.name AS decided_by, d.decided_at
FROM review_items i
JOIN predictions p ON p.id = i.prediction_id
LEFT JOIN review_decisions d ON d.id = i.decision_id
LEFT JOIN reviewers r ON r.id = d.reviewer_id
WHERE i.id = %(item_id)s
