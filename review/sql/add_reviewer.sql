INSERT INTO reviewers (name, password_hash) VALUES (%(name)s, %(password_hash)s)
ON CONFLICT (name) DO UPDATE SET password_hash = EXCLUDED.password_hash, active = true
WHERE %(replace)s
RETURNING id, (xmax = 0) AS created
