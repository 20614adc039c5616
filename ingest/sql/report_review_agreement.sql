-- Review desk: how often the current decision on a photo agrees with the model's answer, per
-- model version and predicted class. A decision covers every prediction row of its content
-- (same sha256); "photo unusable" says nothing about the answer and is left out.
SELECT p.model_version, p.label AS predicted, count(*) AS decided,
       count(*) FILTER (WHERE d.label = p.label) AS agreed,
       round(avg((d.label = p.label)::int)::numeric, 3) AS agreement
FROM review_items i
JOIN review_decisions d ON d.id = i.decision_id
JOIN predictions p ON p.sha256 = i.sha256 AND p.status = 'ok'
WHERE d.outcome <> 'unusable' AND d.decided_at >= %(since)s
GROUP BY p.model_version, p.label
ORDER BY p.model_version, p.label
