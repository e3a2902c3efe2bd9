-- The retrain worker's coordination state. Postgres, not the broker, is the system of record: a
-- request is acknowledged to RabbitMQ only once it is a row here, so nothing acknowledged is lost.

-- A quality-gate refusal is a run outcome of its own.
ALTER TABLE audotics_trainer.training_runs DROP CONSTRAINT training_runs_status_check;
ALTER TABLE audotics_trainer.training_runs ADD CONSTRAINT training_runs_status_check
    CHECK (status IN ('running', 'succeeded', 'rejected', 'failed', 'insufficient_data', 'stopped'));

-- Every retrain request ever received, once per event_id (a redelivery is a no-op). A request with
-- run_id NULL and no answer is pending: the next run of its model claims all pending requests at
-- once, which is the coalescing.
CREATE TABLE audotics_trainer.retrain_requests (
    event_id           TEXT PRIMARY KEY,
    model              TEXT NOT NULL,
    received_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    requested_at       TIMESTAMPTZ,
    interactions_until TIMESTAMPTZ,
    reason             TEXT,
    params             JSONB,
    run_id             UUID,
    answered_at        TIMESTAMPTZ,
    answer             TEXT CHECK (answer IN ('model-ready', 'model-rejected', 'model-failed')),
    answered_version   TEXT,
    answer_event_id    UUID
);
CREATE INDEX retrain_requests_pending_idx ON audotics_trainer.retrain_requests (model, received_at)
    WHERE run_id IS NULL AND answered_at IS NULL;
CREATE INDEX retrain_requests_run_idx ON audotics_trainer.retrain_requests (run_id);

-- Runs the worker schedules. 'running' holds a lease (owner, token, expiry) renewed by heartbeats;
-- an expired lease lets another worker take the run over and resume it from its checkpoint.
-- 'retry' waits until available_at after a failed attempt (or a graceful stop).
CREATE TABLE audotics_trainer.run_jobs (
    run_id           UUID PRIMARY KEY,
    model            TEXT NOT NULL,
    state            TEXT NOT NULL
                     CHECK (state IN ('running', 'retry', 'succeeded', 'rejected', 'failed', 'insufficient_data')),
    params           JSONB,
    attempts         INTEGER NOT NULL DEFAULT 0,
    takeovers        INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_token      UUID,
    lease_expires_at TIMESTAMPTZ,
    available_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at      TIMESTAMPTZ,
    version          TEXT,
    last_error       TEXT
);
-- Exclusivity, enforced by the database: at most one active (running or retrying) run per model.
CREATE UNIQUE INDEX run_jobs_one_active_per_model ON audotics_trainer.run_jobs (model)
    WHERE state IN ('running', 'retry');

-- Every version the worker published, with its model-ready event (re-announced, same event_id, to
-- requests it already covers).
CREATE TABLE audotics_trainer.model_versions (
    model           TEXT NOT NULL,
    version         TEXT NOT NULL,
    run_id          UUID NOT NULL,
    data_watermark  TIMESTAMPTZ,
    recall_at_10    DOUBLE PRECISION,
    event           JSONB NOT NULL,
    published_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);
CREATE INDEX model_versions_latest_idx ON audotics_trainer.model_versions (model, published_at DESC);

-- Transactional outbox: events are written in the same transaction as the state they announce and
-- published (with confirms) afterwards, so an event is never lost and never announces a rolled-back
-- state. Delivery is at least once; consumers dedupe on event_id.
CREATE TABLE audotics_trainer.outbox (
    id           BIGSERIAL PRIMARY KEY,
    event_id     UUID NOT NULL,
    routing_key  TEXT NOT NULL,
    body         JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);
CREATE INDEX outbox_unpublished_idx ON audotics_trainer.outbox (id) WHERE published_at IS NULL;
