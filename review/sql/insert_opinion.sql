INSERT INTO review_opinions (item_id, round, reviewer_id, outcome, label)
VALUES (%(item_id)s, %(round)s, %(reviewer_id)s, %(outcome)s, %(label)s)
RETURNING id
