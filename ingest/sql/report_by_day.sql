-- Photos per day and category (label; rejected ones as their error code), per model version.
SELECT (predicted_at AT TIME ZONE 'UTC')::date AS day, model_name, model_version,
       CASE WHEN status = 'ok' THEN label ELSE 'rejected:' || coalesce(error_code, '?') END AS category,
       count(*) AS images,
       count(*) FILTER (WHERE needs_review) AS needs_review,
       round(avg(confidence)::numeric, 3) AS mean_confidence
FROM predictions
WHERE predicted_at >= %(since)s
GROUP BY 1, 2, 3, 4
ORDER BY day, model_name, model_version, images DESC, category
