-- Undo: the item gets back the decision the undone one replaced (or none: open again, held by the
-- reviewer who undid), and the undone decision is removed, as if never made.
UPDATE review_items i
SET decision_id = prev.id, decided_at = prev.decided_at,
    claimed_by = CASE WHEN prev.id IS NULL THEN %(reviewer_id)s END,
    claimed_at = CASE WHEN prev.id IS NULL THEN now() END,
    lease_until = CASE WHEN prev.id IS NULL THEN now() + make_interval(secs => %(lease_s)s) END
FROM (SELECT %(supersedes)s::bigint AS wanted) w
LEFT JOIN review_decisions prev ON prev.id = w.wanted
WHERE i.id = %(item_id)s;
DELETE FROM review_decisions WHERE id = %(decision_id)s;
