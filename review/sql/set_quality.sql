-- The quality settings given (NULL: unchanged).
UPDATE review_settings SET gold_share = coalesce(%(gold)s, gold_share),
                           second_opinion_share = coalesce(%(second)s, second_opinion_share),
                           second_opinion_audit = coalesce(%(audit)s, second_opinion_audit)
