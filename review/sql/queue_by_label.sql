-- Items waiting per predicted label: how many, how many audit, how many wait for a second or third
-- opinion, how many are held now, the oldest and its age.
SELECT p.label, count(*) AS open, count(*) FILTER (WHERE i.reason = 'audit') AS audit,
       count(*) FILTER (WHERE i.stage IN ('second', 'third')) AS opinion,
       count(*) FILTER (WHERE i.lease_until > now()) AS claimed,
       min(i.received_at) AS oldest, now() - min(i.received_at) AS age
FROM review_items i
JOIN predictions p ON p.id = i.prediction_id
WHERE i.stage <> 'settled'
GROUP BY p.label
ORDER BY count(*) DESC, p.label
