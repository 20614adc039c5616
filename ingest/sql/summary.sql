-- Rows per label and model version, newest model first.
SELECT model_name, model_version, status, coalesce(label, '-') AS label,
       count(*) AS images, round(avg(confidence)::numeric, 3) AS mean_confidence,
       count(*) FILTER (WHERE needs_review) AS needs_review
FROM predictions
WHERE predicted_at >= %(since)s
GROUP BY model_name, model_version, status, label
ORDER BY model_version DESC, status, images DESC, label
