-- Logout: the session ends now (its cookie is worth nothing from here on).
UPDATE review_sessions SET ended_at = now() WHERE token_sha256 = %(token_sha256)s AND ended_at IS NULL
