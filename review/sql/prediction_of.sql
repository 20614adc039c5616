-- The model and version that answered a content first (what its categories are), or no row.
SELECT model_name, model_version FROM predictions WHERE sha256 = %(sha256)s AND status = 'ok' ORDER BY id LIMIT 1
