-- Undo a decision: the item gets back the decision the undone one replaced (or none: open again),
-- and the undone decision is removed, as if never made. review_settle then says where it stands.
UPDATE review_items i
SET decision_id = prev.id, decided_at = prev.decided_at
FROM (SELECT %(supersedes)s::bigint AS wanted) w
LEFT JOIN review_decisions prev ON prev.id = w.wanted
WHERE i.id = %(item_id)s;
DELETE FROM review_decisions WHERE id = %(decision_id)s;
SELECT review_settle(%(item_id)s)
