-- A reviewer logs out: the items they hold go back to the queue at once, and a gold item shown to
-- them and not answered is as if never shown.
UPDATE review_items SET claimed_by = NULL, claimed_at = NULL, lease_until = NULL
WHERE claimed_by = %(reviewer_id)s AND stage <> 'settled';
DELETE FROM review_gold_answers WHERE reviewer_id = %(reviewer_id)s AND answered_at IS NULL
