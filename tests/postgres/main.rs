//! Integration tests against a real PostgreSQL: each test gets its own database, created and dropped
//! by the harness. The server comes from `TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); if it is unreachable the tests fail, loudly.

mod helpers;
mod ledger;
mod load;
mod outbox;
mod prune;
mod seed;
mod train;
