-- A reviewer's answers, newest first: decisions (whether each is still its item's current one,
-- and whether it can still be changed: not once another reviewer gave an opinion on the item),
-- and opinions and gold answers (final once given). reason: how the photo came to the desk, as
-- its page shows it.
SELECT * FROM (
    SELECT d.id, d.item_id, d.decided_at, d.outcome, d.label, d.previous_label, CASE WHEN i.reason <> 'gold' THEN i.reason WHEN p.needs_review THEN 'needs_review' ELSE 'audit' END AS reason,
           p.label AS model_label, p.model_version, (i.decision_id = d.id) AS current,
           EXISTS (SELECT 1 FROM review_opinions o WHERE o.item_id = i.id) AS final
    FROM review_decisions d
    JOIN review_items i ON i.id = d.item_id
    JOIN predictions p ON p.id = i.prediction_id
    WHERE d.reviewer_id = %(reviewer_id)s
    UNION ALL
    SELECT o.id, o.item_id, o.decided_at, o.outcome, o.label, NULL, CASE WHEN i.reason <> 'gold' THEN i.reason WHEN p.needs_review THEN 'needs_review' ELSE 'audit' END,
           p.label, p.model_version, true, true
    FROM review_opinions o
    JOIN review_items i ON i.id = o.item_id
    JOIN predictions p ON p.id = i.prediction_id
    WHERE o.reviewer_id = %(reviewer_id)s
    UNION ALL
    SELECT a.id, a.item_id, a.answered_at, a.outcome, a.label, NULL, CASE WHEN i.reason <> 'gold' THEN i.reason WHEN p.needs_review THEN 'needs_review' ELSE 'audit' END,
           p.label, p.model_version, true, true
    FROM review_gold_answers a
    JOIN review_items i ON i.id = a.item_id
    JOIN predictions p ON p.id = i.prediction_id
    WHERE a.reviewer_id = %(reviewer_id)s AND a.answered_at IS NOT NULL
) x
ORDER BY decided_at DESC, id DESC
LIMIT %(limit)s
