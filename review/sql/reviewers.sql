-- Every reviewer: active or not, last login, decisions made (and of them current), open sessions.
SELECT r.name, r.active, r.lead, r.created_at, r.last_login_at, r.deactivated_at,
       (SELECT count(*) FROM review_decisions d WHERE d.reviewer_id = r.id) AS decisions,
       (SELECT max(d.decided_at) FROM review_decisions d WHERE d.reviewer_id = r.id) AS last_decision_at,
       (SELECT count(*) FROM review_sessions s
        WHERE s.reviewer_id = r.id AND s.ended_at IS NULL AND s.expires_at > now()
          AND s.session_version = r.session_version AND r.active) AS sessions
FROM reviewers r
ORDER BY r.name
