-- Give back an item claimed in this transaction (a gold item is shown instead).
UPDATE review_items SET claimed_by = NULL, claimed_at = NULL, lease_until = NULL WHERE id = %(item_id)s
