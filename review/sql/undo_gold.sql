-- Undo a gold answer: the gold item is shown to the reviewer again, unanswered.
UPDATE review_gold_answers SET answered_at = NULL, outcome = NULL, label = NULL, correct = NULL
WHERE id = %(answer_id)s
