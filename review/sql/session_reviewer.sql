-- The reviewer of a session still valid: not ended, not expired, the account active and its
-- session_version unchanged since login.
SELECT r.id, r.name, r.lead
FROM review_sessions s
JOIN reviewers r ON r.id = s.reviewer_id
WHERE s.token_sha256 = %(token_sha256)s AND s.ended_at IS NULL AND s.expires_at > now()
  AND r.active AND r.session_version = s.session_version
