-- 007: the review desk for a team. Sessions live in PostgreSQL, so that logging out, deactivating
-- an account and changing its password end them at once: the cookie carries a random token, the
-- row its sha256. A session is valid while it has not ended, has not expired (12 h from login, not
-- renewed), its reviewer is active and the reviewer's session_version is the one it was made with
-- (a new password or a deactivation adds one to it).
ALTER TABLE reviewers ADD COLUMN session_version integer NOT NULL DEFAULT 1;
ALTER TABLE reviewers ADD COLUMN last_login_at timestamptz;
ALTER TABLE reviewers ADD COLUMN deactivated_at timestamptz;

CREATE TABLE review_sessions (
    token_sha256     text PRIMARY KEY,
    reviewer_id      bigint NOT NULL REFERENCES reviewers (id),
    session_version  integer NOT NULL,
    address          text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    ended_at         timestamptz
);
CREATE INDEX review_sessions_open ON review_sessions (reviewer_id) WHERE ended_at IS NULL;
