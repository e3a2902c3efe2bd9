//! The publisher's side of the outbox: the next events, published or parked.

use serde_json::Value;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

/// One unpublished outbox event.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub id: i64,
    pub event_id: Uuid,
    pub routing_key: String,
    pub body: Value,
}

/// The oldest unpublished events, locked for this publisher until `tx` ends.
pub async fn next_outbox(tx: &mut Transaction<'_, Postgres>, limit: i64) -> sqlx::Result<Vec<OutboxEvent>> {
    let rows = sqlx::query(
        "SELECT id, event_id, routing_key, body FROM audotics_trainer.outbox
         WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| OutboxEvent {
            id: r.get("id"),
            event_id: r.get("event_id"),
            routing_key: r.get("routing_key"),
            body: r.get("body"),
        })
        .collect())
}

pub async fn mark_published(tx: &mut Transaction<'_, Postgres>, id: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE audotics_trainer.outbox SET published_at = now(), attempts = attempts + 1 WHERE id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}

/// Counts a failed publish of event `id`; after `max_attempts` the event is parked (no longer
/// tried, so it stops blocking the events behind it). Returns whether it is parked now.
pub async fn mark_publish_failed(pool: &PgPool, id: i64, error: &str, max_attempts: i32) -> sqlx::Result<bool> {
    let parked: Option<bool> = sqlx::query_scalar(
        "UPDATE audotics_trainer.outbox
         SET attempts = attempts + 1, last_error = $2,
             parked_at = CASE WHEN attempts + 1 >= $3 THEN now() END
         WHERE id = $1 RETURNING parked_at IS NOT NULL",
    )
    .bind(id)
    .bind(error)
    .bind(max_attempts)
    .fetch_optional(pool)
    .await?;
    Ok(parked.unwrap_or(false))
}
