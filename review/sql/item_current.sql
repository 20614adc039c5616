-- A locked item's state: its stage, its claim, its current decision (who, what, when), how many
-- opinions it has, and what this reviewer already gave on it (a gold answer, an opinion).
SELECT i.id, i.sha256, i.stage, i.claimed_by, i.lease_until > now() AS leased, i.decision_id,
       p.label AS model_label, d.label AS decided_label, d.outcome AS decided_outcome,
       d.reviewer_id AS decided_by_id, r.name AS decided_by, d.decided_at,
       (SELECT count(*) FROM review_opinions o WHERE o.item_id = i.id) AS opinions,
       EXISTS (SELECT 1 FROM review_decisions m WHERE m.item_id = i.id AND m.reviewer_id = %(reviewer_id)s) AS my_decision,
       mo.id AS my_opinion_id, mo.label AS my_opinion_label,
       ga.id AS my_gold_id, ga.label AS my_gold_label
FROM review_items i
JOIN predictions p ON p.id = i.prediction_id
LEFT JOIN review_decisions d ON d.id = i.decision_id
LEFT JOIN reviewers r ON r.id = d.reviewer_id
LEFT JOIN review_opinions mo ON mo.item_id = i.id AND mo.reviewer_id = %(reviewer_id)s
LEFT JOIN review_gold_answers ga ON ga.item_id = i.id AND ga.reviewer_id = %(reviewer_id)s AND ga.answered_at IS NOT NULL
WHERE i.id = %(item_id)s
