-- Show this reviewer a gold item (a photo of known label) they have not seen: one whose item is
-- settled, whose photo is in processed/, that they have neither decided nor given an opinion on,
-- and whose page they were never shown with its answers.
INSERT INTO review_gold_answers (sha256, item_id, reviewer_id)
SELECT g.sha256, i.id, %(reviewer_id)s
FROM review_gold g
JOIN review_items i ON i.sha256 = g.sha256
WHERE i.stage = 'settled'
  AND EXISTS (SELECT 1 FROM ingest_files f WHERE f.sha256 = g.sha256 AND f.destination = 'processed'
              AND f.state = 'moved' AND f.pruned_at IS NULL)
  AND NOT EXISTS (SELECT 1 FROM review_gold_answers a WHERE a.sha256 = g.sha256 AND a.reviewer_id = %(reviewer_id)s)
  AND NOT EXISTS (SELECT 1 FROM review_decisions d WHERE d.item_id = i.id AND d.reviewer_id = %(reviewer_id)s)
  AND NOT EXISTS (SELECT 1 FROM review_opinions o WHERE o.item_id = i.id AND o.reviewer_id = %(reviewer_id)s)
  AND NOT EXISTS (SELECT 1 FROM review_item_views v WHERE v.item_id = i.id AND v.reviewer_id = %(reviewer_id)s)
ORDER BY random()
LIMIT 1
ON CONFLICT (sha256, reviewer_id) DO NOTHING
RETURNING item_id
