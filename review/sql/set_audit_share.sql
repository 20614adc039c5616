UPDATE review_settings SET audit_share = %(share)s RETURNING audit_share
