-- Review desk: each reviewer's accuracy on gold items (photos of known label, shown like any other
-- item), with the Wilson score interval at 95 percent.
WITH answered AS (
    SELECT r.name AS reviewer, count(*)::float8 AS n, count(*) FILTER (WHERE a.correct)::float8 AS k
    FROM review_gold_answers a
    JOIN reviewers r ON r.id = a.reviewer_id
    WHERE a.answered_at >= %(since)s
    GROUP BY r.name
)
SELECT reviewer, n::bigint AS gold_answered, k::bigint AS correct, round((k / n)::numeric, 3) AS accuracy,
       review_wilson(k, n, -1) AS ci95_low, review_wilson(k, n, 1) AS ci95_high
FROM answered
ORDER BY reviewer
