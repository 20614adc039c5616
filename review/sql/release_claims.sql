-- A reviewer logs out: the open items they hold go back to the queue at once.
UPDATE review_items SET claimed_by = NULL, claimed_at = NULL, lease_until = NULL
WHERE claimed_by = %(reviewer_id)s AND decision_id IS NULL
