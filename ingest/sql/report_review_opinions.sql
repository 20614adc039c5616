-- Review desk: second opinions. Of the items first decided in the period: how many were sent for a
-- second opinion, how many wait for the second or a third, and how the rest settled (the two
-- agreed; a third opinion made a majority; three different answers: no majority).
SELECT count(*) FILTER (WHERE second_opinion) AS sent,
       count(*) FILTER (WHERE stage = 'second') AS awaiting_second,
       count(*) FILTER (WHERE stage = 'third') AS awaiting_third,
       count(*) FILTER (WHERE settled_how = 'agreement') AS agreed,
       count(*) FILTER (WHERE settled_how = 'majority') AS majority,
       count(*) FILTER (WHERE settled_how = 'no majority') AS no_majority
FROM review_items
WHERE decision_id IS NOT NULL AND decided_at >= %(since)s
