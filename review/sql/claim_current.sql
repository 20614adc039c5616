-- The open item this reviewer already holds (a reload, or back after a refused POST): renew its lease.
UPDATE review_items
SET lease_until = now() + make_interval(secs => %(lease_s)s)
WHERE id = (SELECT id FROM review_items
            WHERE claimed_by = %(reviewer_id)s AND decision_id IS NULL AND lease_until > now()
            ORDER BY claimed_at LIMIT 1)
RETURNING id
