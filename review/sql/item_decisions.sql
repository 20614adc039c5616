-- Every answer an item has had, oldest first: its decisions (a changed decision keeps its history)
-- and the second and third opinions after them.
SELECT * FROM (
    SELECT d.id, d.decided_at, r.name AS reviewer, 'decision' AS kind, d.outcome, d.label, d.previous_label, d.supersedes
    FROM review_decisions d JOIN reviewers r ON r.id = d.reviewer_id
    WHERE d.item_id = %(item_id)s
    UNION ALL
    SELECT o.id, o.decided_at, r.name, CASE o.round WHEN 2 THEN 'second opinion' ELSE 'third opinion' END,
           o.outcome, o.label, NULL, NULL
    FROM review_opinions o JOIN reviewers r ON r.id = o.reviewer_id
    WHERE o.item_id = %(item_id)s
) x
ORDER BY decided_at, id
