-- A reviewer was shown an item's page with its answers: it is never a gold item for them.
INSERT INTO review_item_views (reviewer_id, item_id) VALUES (%(reviewer_id)s, %(item_id)s)
ON CONFLICT DO NOTHING
