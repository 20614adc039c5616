-- A photo of known label from a catalogue, by content. Recorded as gold once its content has a
-- prediction (the item shown needs one); a content with no review item gets one, settled by the
-- catalogue and in no queue. A content with an item keeps it, its queue and its decisions.
WITH p AS (
    SELECT id, received_at FROM predictions WHERE sha256 = %(sha256)s AND status = 'ok' ORDER BY id LIMIT 1
), g AS (
    INSERT INTO review_gold (sha256, outcome, label, source)
    SELECT %(sha256)s, %(outcome)s, %(label)s, 'catalogue' FROM p
    ON CONFLICT (sha256) DO NOTHING
    RETURNING sha256
), i AS (
    INSERT INTO review_items (sha256, prediction_id, reason, received_at, stage, settled_outcome, settled_label, settled_how)
    SELECT %(sha256)s, p.id, 'gold', p.received_at, 'settled', %(outcome)s, %(label)s, 'catalogue' FROM p
    ON CONFLICT (sha256) DO NOTHING
    RETURNING id
)
SELECT (SELECT count(*) FROM p) > 0 AS recorded, (SELECT count(*) FROM g) > 0 AS added
