-- Every decision an item has had, oldest first (a changed decision keeps its history).
SELECT d.id, d.decided_at, r.name AS reviewer, d.outcome, d.label, d.previous_label, d.supersedes
FROM review_decisions d JOIN reviewers r ON r.id = d.reviewer_id
WHERE d.item_id = %(item_id)s
ORDER BY d.id
