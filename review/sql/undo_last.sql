-- The reviewer's latest answer of any kind (a decision, an opinion, a gold answer): whether it is
-- still in force, how long ago it was given, whether an export wrote it, and what was built on it
-- since (opinions after a decision; gold answers on a photo an agreement made gold). An opinion
-- counts as exported when its item's label was.
SELECT x.*, extract(epoch FROM now() - x.at) AS age_s FROM (
    SELECT 'decision' AS kind, d.id, d.item_id, d.supersedes, (i.decision_id = d.id) AS current, d.decided_at AS at,
           d.exported_at IS NOT NULL AS exported,
           (SELECT count(*) FROM review_opinions o WHERE o.item_id = d.item_id) AS built_on
    FROM review_decisions d JOIN review_items i ON i.id = d.item_id
    WHERE d.reviewer_id = %(reviewer_id)s
    UNION ALL
    SELECT 'opinion', o.id, o.item_id, NULL,
           NOT EXISTS (SELECT 1 FROM review_opinions l WHERE l.item_id = o.item_id AND l.round > o.round),
           o.decided_at,
           coalesce((SELECT d.exported_at IS NOT NULL FROM review_items j JOIN review_decisions d ON d.id = j.decision_id
                     WHERE j.id = o.item_id), false),
           (SELECT count(*) FROM review_gold_answers a JOIN review_gold g ON g.sha256 = a.sha256 AND g.source = 'agreement'
            JOIN review_items j ON j.sha256 = a.sha256 WHERE j.id = o.item_id)
    FROM review_opinions o
    WHERE o.reviewer_id = %(reviewer_id)s
    UNION ALL
    SELECT 'gold', a.id, a.item_id, NULL, true, a.answered_at, false, 0
    FROM review_gold_answers a
    WHERE a.reviewer_id = %(reviewer_id)s AND a.answered_at IS NOT NULL
) x
ORDER BY at DESC, id DESC
LIMIT 1
