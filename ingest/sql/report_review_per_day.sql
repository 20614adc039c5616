-- Review desk: decisions made per day (UTC), changes of an earlier decision included and counted apart.
SELECT (d.decided_at AT TIME ZONE 'UTC')::date AS day, count(*) AS decisions,
       count(*) FILTER (WHERE d.supersedes IS NOT NULL) AS changes,
       count(*) FILTER (WHERE d.outcome = 'category') AS category,
       count(*) FILTER (WHERE d.outcome = 'other') AS not_refund,
       count(*) FILTER (WHERE d.outcome = 'unusable') AS unusable,
       count(DISTINCT d.reviewer_id) AS reviewers
FROM review_decisions d
WHERE d.decided_at >= %(since)s
GROUP BY 1
ORDER BY 1
