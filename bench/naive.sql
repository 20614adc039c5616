-- The naive baseline's table: what the original project wrote, one INSERT and one commit per image.
CREATE TABLE IF NOT EXISTS naive_predictions (
    id          bigserial PRIMARY KEY,
    sha256      text NOT NULL UNIQUE,
    path        text NOT NULL,
    label       text,
    confidence  double precision,
    topk        jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
