SELECT audit_share, gold_share, second_opinion_share, second_opinion_audit FROM review_settings
