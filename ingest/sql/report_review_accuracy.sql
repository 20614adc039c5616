-- Review desk: reviewed accuracy of the answers that needed review, per model version: how often
-- the model's (unsure) answer was what the reviewer decided. "photo unusable" is left out.
SELECT p.model_version, count(*) AS reviewed, count(*) FILTER (WHERE d.label = p.label) AS correct,
       round(avg((d.label = p.label)::int)::numeric, 3) AS accuracy
FROM review_items i
JOIN review_decisions d ON d.id = i.decision_id
JOIN predictions p ON p.sha256 = i.sha256 AND p.status = 'ok' AND p.needs_review
WHERE d.outcome <> 'unusable' AND d.decided_at >= %(since)s
GROUP BY p.model_version
ORDER BY p.model_version
