SELECT id, name, password_hash, active FROM reviewers WHERE name = %(name)s
