-- Every label a model version answered among its top-k: the category list when its archive is not at hand.
SELECT DISTINCT t.label
FROM predictions p, jsonb_to_recordset(p.topk) AS t(label text)
WHERE p.model_name = %(model_name)s AND p.model_version = %(model_version)s AND p.status = 'ok'
ORDER BY t.label
