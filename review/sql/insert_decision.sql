INSERT INTO review_decisions (item_id, sha256, reviewer_id, outcome, label, previous_label, supersedes)
VALUES (%(item_id)s, %(sha256)s, %(reviewer_id)s, %(outcome)s, %(label)s, %(previous_label)s, %(supersedes)s)
RETURNING id
