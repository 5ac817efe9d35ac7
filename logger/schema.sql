-- Audit trail of every prediction. Applied at every start: idempotent, and portable between
-- PostgreSQL (production) and SQLite (the embedded default) so both run the same code path.
CREATE TABLE IF NOT EXISTS predictions (
    request_id      TEXT PRIMARY KEY,          -- TorchServe's request id: inserting twice is a no-op
    ts              TEXT NOT NULL,             -- ISO 8601 UTC, set by the handler
    model_name      TEXT NOT NULL,
    model_version   TEXT NOT NULL,
    model_sha256    TEXT,
    image_sha256    TEXT,                      -- the image itself is never stored
    image_bytes     BIGINT,
    image_format    TEXT,
    image_width     INTEGER,
    image_height    INTEGER,
    status          INTEGER NOT NULL,          -- 200, or the 4xx the client got
    top_class       TEXT,                      -- the top class the client was shown (none when refused)
    top_probability DOUBLE PRECISION,
    probabilities   TEXT,                      -- JSON object {class: probability}
    needs_review    BOOLEAN,                   -- the verdict asks for a clinician's look: 'uncertain' or 'not_dermoscopy'
    verdict         TEXT,
    error_code      TEXT,
    error_reason    TEXT,
    latency_ms      DOUBLE PRECISION,
    kind            TEXT,                      -- which endpoint answered: prediction or explanation
    concern_flagged BOOLEAN,                   -- the answer urged an examination (none when refused or older)
    inserted_at     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
CREATE INDEX IF NOT EXISTS predictions_model ON predictions (model_name, model_version);

-- How far each spool file has been consumed; updated in the same transaction as the inserts.
CREATE TABLE IF NOT EXISTS spool_offsets (
    file        TEXT PRIMARY KEY,
    byte_offset BIGINT NOT NULL,
    updated_at  TEXT NOT NULL
);
