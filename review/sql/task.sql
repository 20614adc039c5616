-- What an item is to a reviewer: its stage, whether they hold it, whether it is a gold item shown
-- to them and not answered, whether its label is known (gold), whether they already answered on it
-- (a decision, an opinion or a gold answer), and whether they are a lead.
SELECT i.stage,
       i.claimed_by = %(reviewer_id)s AND i.lease_until > now() AS held,
       EXISTS (SELECT 1 FROM review_gold_answers a WHERE a.item_id = i.id AND a.reviewer_id = %(reviewer_id)s
               AND a.answered_at IS NULL) AS gold_held,
       EXISTS (SELECT 1 FROM review_gold g WHERE g.sha256 = i.sha256) AS gold,
       EXISTS (SELECT 1 FROM review_decisions d WHERE d.item_id = i.id AND d.reviewer_id = %(reviewer_id)s)
       OR EXISTS (SELECT 1 FROM review_opinions o WHERE o.item_id = i.id AND o.reviewer_id = %(reviewer_id)s)
       OR EXISTS (SELECT 1 FROM review_gold_answers a WHERE a.item_id = i.id AND a.reviewer_id = %(reviewer_id)s
                  AND a.answered_at IS NOT NULL) AS answered,
       r.lead
FROM review_items i, reviewers r
WHERE i.id = %(item_id)s AND r.id = %(reviewer_id)s
