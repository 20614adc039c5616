-- Review desk: the items waiting (for a decision, or a second or third opinion), of them audit
-- ones, those held by a reviewer now, and the oldest.
SELECT count(*) FILTER (WHERE stage = 'first') AS open,
       count(*) FILTER (WHERE stage = 'first' AND reason = 'audit') AS open_audit,
       count(*) FILTER (WHERE stage IN ('second', 'third')) AS awaiting_opinion,
       count(*) FILTER (WHERE stage <> 'settled' AND lease_until > now()) AS held_now,
       min(received_at) FILTER (WHERE stage <> 'settled') AS oldest_received
FROM review_items
