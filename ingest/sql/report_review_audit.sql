-- Review desk: measured precision of the confidently accepted answers, per model version, on the
-- audit sample (contents whose sha256 falls below the audit share, review_audit_point), with the
-- Wilson score interval at 95 percent (z = 1.96), which stays inside [0, 1] for small samples.
-- "photo unusable" is left out.
WITH audited AS (
    SELECT p.model_version, count(*)::float8 AS n, count(*) FILTER (WHERE d.label = p.label)::float8 AS k
    FROM review_items i
    JOIN review_decisions d ON d.id = i.decision_id
    JOIN predictions p ON p.sha256 = i.sha256 AND p.status = 'ok' AND NOT p.needs_review
    WHERE d.outcome <> 'unusable' AND d.decided_at >= %(since)s
      AND (i.reason = 'audit' OR review_audit_point(i.sha256) < (SELECT audit_share FROM review_settings))
    GROUP BY p.model_version
), w AS (
    SELECT model_version, n, k, k / n AS p, 1.96::float8 AS z FROM audited
)
SELECT model_version, n::bigint AS audited, k::bigint AS correct, round(p::numeric, 3) AS precision,
       round(((p + z * z / (2 * n) - z * sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n))::numeric, 3) AS ci95_low,
       round(((p + z * z / (2 * n) + z * sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n))::numeric, 3) AS ci95_high
FROM w
ORDER BY model_version
