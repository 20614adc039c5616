-- One item with its prediction, its current decision and the file its photo was moved to.
SELECT i.id, i.sha256, i.reason, i.stage, i.settled_how, i.settled_label, i.received_at, i.queued_at, i.claimed_by, i.lease_until, i.decision_id,
       p.id AS prediction_id, p.label AS model_label, p.confidence, p.topk, p.model_name, p.model_version,
       p.filename, p.needs_review, d.outcome, d.label AS decided_label, d.decided_at, r.name AS decided_by
FROM review_items i
JOIN predictions p ON p.id = i.prediction_id
LEFT JOIN review_decisions d ON d.id = i.decision_id
LEFT JOIN reviewers r ON r.id = d.reviewer_id
WHERE i.id = %(item_id)s
