-- A reviewer logs in: a new session, and the login time.
WITH r AS (
    UPDATE reviewers SET last_login_at = now() WHERE id = %(reviewer_id)s AND active
    RETURNING id, session_version
)
INSERT INTO review_sessions (token_sha256, reviewer_id, session_version, address, expires_at)
SELECT %(token_sha256)s, r.id, r.session_version, %(address)s, now() + make_interval(secs => %(lifetime_s)s)
FROM r
RETURNING reviewer_id
