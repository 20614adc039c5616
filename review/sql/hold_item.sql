-- After an undo: the item, waiting again, is held by the reviewer who took their answer back.
UPDATE review_items
SET claimed_by = %(reviewer_id)s, claimed_at = now(), lease_until = now() + make_interval(secs => %(lease_s)s)
WHERE id = %(item_id)s AND stage <> 'settled'
RETURNING id
