-- What an item is to a reviewer: its stage, whether they hold its claim (its lease may have run
-- out), whether it is a gold item shown to them and not answered, whether they made a decision on
-- it, and whether they are a lead.
SELECT i.stage,
       i.claimed_by IS NOT DISTINCT FROM %(reviewer_id)s AS mine,
       EXISTS (SELECT 1 FROM review_gold_answers a WHERE a.item_id = i.id AND a.reviewer_id = %(reviewer_id)s
               AND a.answered_at IS NULL) AS gold_held,
       EXISTS (SELECT 1 FROM review_decisions d WHERE d.item_id = i.id AND d.reviewer_id = %(reviewer_id)s) AS decided,
       r.lead
FROM review_items i, reviewers r
WHERE i.id = %(item_id)s AND r.id = %(reviewer_id)s
