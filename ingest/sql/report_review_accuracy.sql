-- Review desk: reviewed accuracy of the answers that needed review, per model version: how often
-- the model's (unsure) answer was the photo's settled label. "photo unusable", photos without a
-- majority and photos still waiting for an opinion are left out.
SELECT p.model_version, count(*) AS reviewed, count(*) FILTER (WHERE i.settled_label = p.label) AS correct,
       round(avg((i.settled_label = p.label)::int)::numeric, 3) AS accuracy
FROM review_items i
JOIN predictions p ON p.sha256 = i.sha256 AND p.status = 'ok' AND p.needs_review
WHERE i.stage = 'settled' AND i.settled_outcome IN ('category', 'other') AND i.reason <> 'gold'
  AND i.settled_at >= %(since)s
GROUP BY p.model_version
ORDER BY p.model_version
