//! Publishes the outbox: events written in the same transaction as the state they announce, sent
//! with publisher confirms and marked published only once RabbitMQ confirmed them. A crash between
//! the confirm and the mark re-sends the event with the same `event_id` (at least once).

use std::sync::Arc;

use tracing::{error, info, warn};

use super::Shared;
use crate::broker::{self, Delivered, EVENTS_EXCHANGE};
use crate::db::coord;

/// Publishes whenever woken, and every poll interval (events other workers left behind).
pub(super) async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if let Err(e) = publish_pending(&shared).await {
            warn!(error.message = %format!("{e:#}"), "outbox publish failed; retrying");
        }
        if shared.shutting_down() {
            return;
        }
        tokio::select! {
            _ = shared.outbox_wake.notified() => {}
            _ = tokio::time::sleep(shared.poll()) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }
}

/// Publishes every unpublished event; returns how many. Nothing happens without a broker channel.
pub(super) async fn publish_pending(shared: &Shared) -> anyhow::Result<usize> {
    let Some(channel) = shared.publish_channel.read().await.clone() else {
        return Ok(0);
    };
    let mut published = 0;
    loop {
        let mut tx = shared.pool.begin().await?;
        let events = coord::next_outbox(&mut tx, 20).await?;
        if events.is_empty() {
            tx.commit().await?;
            return Ok(published);
        }
        for event in events {
            let body = serde_json::to_vec(&event.body)?;
            let started = std::time::Instant::now();
            let kind = event.routing_key.split('.').next().unwrap_or("event").to_string();
            match broker::publish_json(
                &channel,
                EVENTS_EXCHANGE,
                &event.routing_key,
                &body,
                &event.event_id.to_string(),
                None,
            )
            .await
            {
                Ok(delivered) => {
                    coord::mark_published(&mut tx, event.id).await?;
                    published += 1;
                    let routed = delivered == Delivered::Routed;
                    metrics::counter!("audotics_events_published_total", "kind" => kind.clone(), "routed" => routed.to_string())
                        .increment(1);
                    metrics::histogram!("audotics_event_publish_seconds").record(started.elapsed().as_secs_f64());
                    if routed {
                        info!(event_id = %event.event_id, routing_key = %event.routing_key, "event published");
                    } else {
                        warn!(
                            event_id = %event.event_id,
                            routing_key = %event.routing_key,
                            "event confirmed but unroutable: no queue is bound for it, so nobody received it"
                        );
                    }
                }
                Err(e) => {
                    // Keep what was confirmed, then note the failure (after the row lock is gone).
                    tx.commit().await?;
                    let max = shared.settings.outbox_max_attempts as i32;
                    if let Ok(true) = coord::mark_publish_failed(&shared.pool, event.id, &e.to_string(), max).await {
                        metrics::counter!("audotics_outbox_parked_total", "kind" => kind.clone()).increment(1);
                        error!(
                            event_id = %event.event_id,
                            routing_key = %event.routing_key,
                            attempts = max,
                            error.message = %e,
                            "outbox event parked after OUTBOX_MAX_ATTEMPTS failed publishes; the events behind it go on"
                        );
                    }
                    return Err(e.into());
                }
            }
        }
        tx.commit().await?;
    }
}
