-- The trainer's own tables live in the audotics_trainer schema; the platform's tables (public,
-- managed by Prisma) are only ever read. The schema itself is created before migrations run.

-- Every training run, CLI or worker: what it trained on, how it ended, where its artifacts are.
CREATE TABLE audotics_trainer.training_runs (
    id                UUID PRIMARY KEY,
    model             TEXT NOT NULL,
    version           TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'insufficient_data', 'stopped')),
    trigger           TEXT NOT NULL DEFAULT 'cli',
    attempts          INTEGER NOT NULL DEFAULT 1,
    started_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at       TIMESTAMPTZ,
    -- Newest interaction the run trained on, and how many interactions it read.
    data_watermark    TIMESTAMPTZ,
    interaction_count BIGINT,
    -- Sizes and dirty-data counts of the data as loaded.
    counts            JSONB,
    metrics           JSONB,
    config            JSONB,
    artifact_location TEXT,
    error             TEXT
);

CREATE INDEX training_runs_model_started_idx ON audotics_trainer.training_runs (model, started_at DESC);
