SELECT i.id, i.sha256, i.claimed_by, i.lease_until > now() AS leased, i.decision_id,
       p.label AS model_label, d.label AS decided_label
FROM review_items i
JOIN predictions p ON p.id = i.prediction_id
LEFT JOIN review_decisions d ON d.id = i.decision_id
WHERE i.id = %(item_id)s
FOR UPDATE OF i
