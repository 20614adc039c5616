-- Where the photo of an item lies: the processed file of its prediction, else of any row of the same content.
SELECT f.dest_path, f.dest_path_bytes
FROM review_items i
JOIN ingest_files f ON f.sha256 = i.sha256
WHERE i.id = %(item_id)s AND f.destination = 'processed' AND f.state = 'moved' AND f.pruned_at IS NULL
ORDER BY (f.prediction_id = i.prediction_id) DESC, f.id
LIMIT 1
