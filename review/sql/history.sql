-- A reviewer's answers, newest first: decisions (whether each is still its item's current one,
-- and whether it can still be changed: not once another reviewer gave an opinion on the item),
-- and opinions and gold answers (final once given). reason: how the photo came to the desk, as
-- its page shows it.
SELECT a.id, a.item_id, a.decided_at, a.outcome, a.label, a.previous_label,
       CASE WHEN i.reason <> 'gold' THEN i.reason WHEN p.needs_review THEN 'needs_review' ELSE 'audit' END AS reason,
       p.label AS model_label, p.model_version,
       CASE WHEN a.kind = 'decision' THEN i.decision_id = a.id ELSE true END AS current,
       CASE WHEN a.kind = 'decision' THEN EXISTS (SELECT 1 FROM review_opinions o WHERE o.item_id = i.id)
            ELSE true END AS final
FROM (
    SELECT 'decision' AS kind, id, item_id, decided_at, outcome, label, previous_label
    FROM review_decisions WHERE reviewer_id = %(reviewer_id)s
    UNION ALL
    SELECT 'opinion', id, item_id, decided_at, outcome, label, NULL
    FROM review_opinions WHERE reviewer_id = %(reviewer_id)s
    UNION ALL
    SELECT 'gold', id, item_id, answered_at, outcome, label, NULL
    FROM review_gold_answers WHERE reviewer_id = %(reviewer_id)s AND answered_at IS NOT NULL
) a
JOIN review_items i ON i.id = a.item_id
JOIN predictions p ON p.id = i.prediction_id
ORDER BY a.decided_at DESC, a.id DESC
LIMIT %(limit)s
