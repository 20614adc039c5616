-- The reviewer's latest decision, its item locked: whether it is still the item's current
-- decision, how long ago it was made, and whether an export has written it.
SELECT d.id, d.item_id, d.supersedes, (i.decision_id = d.id) AS current,
       extract(epoch FROM now() - d.decided_at) AS age_s, d.exported_at IS NOT NULL AS exported
FROM review_decisions d
JOIN review_items i ON i.id = d.item_id
WHERE d.reviewer_id = %(reviewer_id)s
ORDER BY d.decided_at DESC, d.id DESC
LIMIT 1
FOR UPDATE OF i
