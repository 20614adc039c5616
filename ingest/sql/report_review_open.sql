-- Review desk: the open items (undecided), of them audit ones and those held by a reviewer now.
SELECT count(*) FILTER (WHERE decision_id IS NULL) AS open,
       count(*) FILTER (WHERE decision_id IS NULL AND reason = 'audit') AS open_audit,
       count(*) FILTER (WHERE decision_id IS NULL AND lease_until > now()) AS held_now,
       min(received_at) FILTER (WHERE decision_id IS NULL) AS oldest_received
FROM review_items
