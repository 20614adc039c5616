-- Review desk: measured precision of the confidently accepted answers, per model version, on the
-- audit sample (contents whose sha256 falls below the audit share, review_audit_point), against
-- each photo's settled label (after a second opinion, where it had one: photos still waiting for
-- one are not counted yet), with the Wilson score interval at 95 percent. "photo unusable", photos
-- without a majority and catalogue photos are left out.
WITH audited AS (
    SELECT p.model_version, count(*)::float8 AS n, count(*) FILTER (WHERE i.settled_label = p.label)::float8 AS k
    FROM review_items i
    JOIN predictions p ON p.sha256 = i.sha256 AND p.status = 'ok' AND NOT p.needs_review
    WHERE i.stage = 'settled' AND i.settled_outcome IN ('category', 'other') AND i.reason <> 'gold'
      AND i.settled_at >= %(since)s
      AND (i.reason = 'audit' OR review_audit_point(i.sha256) < (SELECT audit_share FROM review_settings))
    GROUP BY p.model_version
)
SELECT model_version, n::bigint AS audited, k::bigint AS correct, round((k / n)::numeric, 3) AS precision,
       review_wilson(k, n, -1) AS ci95_low, review_wilson(k, n, 1) AS ci95_high
FROM audited
ORDER BY model_version
