-- Review desk: how often the settled label of a photo agrees with the model's answer, per model
-- version and predicted class. A decision covers every prediction row of its content (same
-- sha256); "photo unusable", photos without a majority and photos still waiting for an opinion
-- are left out.
SELECT p.model_version, p.label AS predicted, count(*) AS decided,
       count(*) FILTER (WHERE i.settled_label = p.label) AS agreed,
       round(avg((i.settled_label = p.label)::int)::numeric, 3) AS agreement
FROM review_items i
JOIN predictions p ON p.sha256 = i.sha256 AND p.status = 'ok'
WHERE i.stage = 'settled' AND i.settled_outcome IN ('category', 'other') AND i.reason <> 'gold'
  AND i.settled_at >= %(since)s
GROUP BY p.model_version, p.label
ORDER BY p.model_version, p.label
