-- Items whose three answers all differ, newest first, with the model's answer.
SELECT i.id, i.decided_at, p.label AS model_label, p.model_version
FROM review_items i
JOIN predictions p ON p.id = i.prediction_id
WHERE i.settled_how = 'no majority'
ORDER BY i.decided_at DESC, i.id DESC
LIMIT %(limit)s
