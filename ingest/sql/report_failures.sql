-- Rejected photos by reason.
SELECT coalesce(error_code, '?') AS reason, model_version, count(*) AS images,
       min(predicted_at) AS first_seen, max(predicted_at) AS last_seen,
       (array_agg(filename ORDER BY predicted_at DESC))[1] AS latest_file
FROM predictions
WHERE status = 'rejected' AND predicted_at >= %(since)s
GROUP BY 1, 2
ORDER BY images DESC, reason
