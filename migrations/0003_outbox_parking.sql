-- An outbox event that keeps failing to publish is parked after OUTBOX_MAX_ATTEMPTS: it stops
-- blocking the events behind it and waits for an operator (its last_error says why).
ALTER TABLE audotics_trainer.outbox ADD COLUMN parked_at TIMESTAMPTZ;
DROP INDEX audotics_trainer.outbox_unpublished_idx;
CREATE INDEX outbox_unpublished_idx ON audotics_trainer.outbox (id) WHERE published_at IS NULL AND parked_at IS NULL;
