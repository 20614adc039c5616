INSERT INTO naive_predictions (sha256, path, label, confidence, topk)
VALUES (%(sha256)s, %(path)s, %(label)s, %(confidence)s, %(topk)s)
ON CONFLICT (sha256) DO NOTHING
