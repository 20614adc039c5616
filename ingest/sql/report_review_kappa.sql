-- Review desk: agreement per pair of reviewers who answered the same photos independently (the
-- decision on an item sent for a second opinion, and the blind opinions after it): photos, share
-- agreeing, and Cohen's kappa (agreement beyond what each one's label frequencies give by chance;
-- empty where chance alone agrees fully). "photo unusable" counts as a label of its own.
WITH answers AS (
    SELECT i.id AS item_id, d.reviewer_id, coalesce(d.label, ':unusable') AS label
    FROM review_items i
    JOIN review_decisions d ON d.id = i.decision_id
    UNION ALL
    SELECT o.item_id, o.reviewer_id, coalesce(o.label, ':unusable') FROM review_opinions o
), pairs AS (
    SELECT a.reviewer_id AS ra, b.reviewer_id AS rb, a.item_id, a.label AS la, b.label AS lb
    FROM answers a
    JOIN answers b ON b.item_id = a.item_id AND a.reviewer_id < b.reviewer_id
    WHERE EXISTS (SELECT 1 FROM review_opinions o WHERE o.item_id = a.item_id AND o.decided_at >= %(since)s)
), observed AS (
    SELECT ra, rb, count(*)::float8 AS n, avg((la = lb)::int)::float8 AS po FROM pairs GROUP BY ra, rb
), chance AS (
    SELECT ra, rb, sum(ca * cb) AS both FROM (
        SELECT x.ra, x.rb, x.c AS ca, y.c AS cb
        FROM (SELECT ra, rb, la AS label, count(*)::float8 AS c FROM pairs GROUP BY ra, rb, la) x
        JOIN (SELECT ra, rb, lb AS label, count(*)::float8 AS c FROM pairs GROUP BY ra, rb, lb) y
          ON y.ra = x.ra AND y.rb = x.rb AND y.label = x.label
    ) m GROUP BY ra, rb
)
SELECT ua.name AS reviewer_a, ub.name AS reviewer_b, o.n::bigint AS photos, round(o.po::numeric, 3) AS agreement,
       CASE WHEN coalesce(c.both, 0) / (o.n * o.n) < 1
            THEN round(((o.po - coalesce(c.both, 0) / (o.n * o.n)) / (1 - coalesce(c.both, 0) / (o.n * o.n)))::numeric, 3)
       END AS kappa
FROM observed o
LEFT JOIN chance c ON c.ra = o.ra AND c.rb = o.rb
JOIN reviewers ua ON ua.id = o.ra
JOIN reviewers ub ON ub.id = o.rb
ORDER BY reviewer_a, reviewer_b
