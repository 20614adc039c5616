SELECT filename, label, round(confidence::numeric, 3) AS confidence, needs_review, model_version, predicted_at
FROM predictions
ORDER BY id DESC
LIMIT %(limit)s
