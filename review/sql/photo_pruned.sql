-- When retention removed the photo of an item (NULL: it did not).
SELECT max(f.pruned_at)
FROM review_items i
JOIN ingest_files f ON f.sha256 = i.sha256
WHERE i.id = %(item_id)s AND f.destination = 'processed'
