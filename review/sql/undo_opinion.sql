-- Undo an opinion: removed, as if never given; a gold photo its agreement made goes with it.
DELETE FROM review_gold g USING review_items i
WHERE i.id = %(item_id)s AND g.sha256 = i.sha256 AND g.source = 'agreement';
DELETE FROM review_opinions WHERE id = %(opinion_id)s;
SELECT review_settle(%(item_id)s)
