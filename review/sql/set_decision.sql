-- The item's current decision is this one; an item decided for the first time is given back by
-- its claimer and chosen for a second opinion now (a change keeps the claim of whoever holds the
-- item for its opinion) (audit items when second_opinion_audit; any item whose content falls below
-- second_opinion_share, by bits of its sha256 the audit sample does not use), then settled.
UPDATE review_items i
SET decision_id = %(decision_id)s, decided_at = now(),
    claimed_by = CASE WHEN %(first)s THEN NULL ELSE i.claimed_by END,
    claimed_at = CASE WHEN %(first)s THEN NULL ELSE i.claimed_at END,
    lease_until = CASE WHEN %(first)s THEN NULL ELSE i.lease_until END,
    second_opinion = CASE WHEN %(first)s THEN
        (SELECT (i.reason = 'audit' AND s.second_opinion_audit)
                OR ('x' || substr(i.sha256, 9, 8))::bit(32)::bigint / 4294967296.0 < s.second_opinion_share
         FROM review_settings s)
        ELSE i.second_opinion END
WHERE i.id = %(item_id)s;
SELECT review_settle(%(item_id)s)
