-- A new reviewer, or (with replace) a new password for one: that also reactivates the account and
-- ends its sessions (session_version + 1).
INSERT INTO reviewers (name, password_hash) VALUES (%(name)s, %(password_hash)s)
ON CONFLICT (name) DO UPDATE SET password_hash = EXCLUDED.password_hash, active = true, deactivated_at = NULL,
                                 session_version = reviewers.session_version + 1
WHERE %(replace)s
RETURNING id, (xmax = 0) AS created
