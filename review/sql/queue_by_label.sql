-- Open items per predicted label: how many, how many audit, the oldest and its age, how many held now.
SELECT p.label, count(*) AS open, count(*) FILTER (WHERE i.reason = 'audit') AS audit,
       count(*) FILTER (WHERE i.lease_until > now()) AS claimed,
       min(i.received_at) AS oldest, now() - min(i.received_at) AS age
FROM review_items i
JOIN predictions p ON p.id = i.prediction_id
WHERE i.decision_id IS NULL
GROUP BY p.label
ORDER BY count(*) DESC, p.label
