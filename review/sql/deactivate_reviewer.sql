-- An account shut: no more logins, its sessions end, the items it holds go back to the queue.
-- (Sessions counted as ended: those still valid until now, made with the password in use.)
WITH r AS (
    UPDATE reviewers SET active = false, deactivated_at = now(), session_version = session_version + 1
    WHERE name = %(name)s
    RETURNING id, session_version - 1 AS old_version
), ended AS (
    UPDATE review_sessions s SET ended_at = now() FROM r WHERE s.reviewer_id = r.id AND s.ended_at IS NULL
    RETURNING s.expires_at > now() AND s.session_version = r.old_version AS live
), released AS (
    UPDATE review_items i SET claimed_by = NULL, claimed_at = NULL, lease_until = NULL
    FROM r WHERE i.claimed_by = r.id AND i.stage <> 'settled'
    RETURNING i.id
), unshown AS (
    DELETE FROM review_gold_answers a USING r WHERE a.reviewer_id = r.id AND a.answered_at IS NULL
)
SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM ended WHERE live), (SELECT count(*) FROM released)
