UPDATE review_items
SET decision_id = %(decision_id)s, decided_at = now(), claimed_by = NULL, claimed_at = NULL, lease_until = NULL
WHERE id = %(item_id)s
