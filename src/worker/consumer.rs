//! The broker supervisor and the request consumer.
//!
//! A session is one connection: declare, consume, until the connection drops. Then the supervisor
//! builds a new one with jittered backoff, and gives up — so the process exits non-zero and its
//! orchestrator restarts it — only after `--broker-max-outage-seconds` without a broker.
//!
//! lapin's automatic recovery is deliberately off. With it on, a connection the supervisor had given
//! up on (recovery too slow) could still be recovered later, in the background, re-registering its
//! consumer; RabbitMQ then sent that consumer up to a prefetch of requests that nobody read, unacked
//! until the worker restarted. The fault suite found it: after a 47-second broker restart, 168
//! requests were stranded on three workers' abandoned connections. One owner of reconnection, and a
//! connection that stays dead once dropped, rule that out.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use rand::Rng;
use tracing::{Instrument, info, info_span, warn};

use super::Shared;
use super::admission;
use crate::broker::{self, DEAD_LETTER_EXCHANGE};
use crate::contract::request::{self, RetrainRequest};
use crate::db::coord::{self, Recorded};

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Consumes until shutdown; `Err` when the broker stayed unreachable past the allowed outage.
pub(super) async fn run(shared: Arc<Shared>) -> anyhow::Result<()> {
    let max_outage = Duration::from_secs(shared.settings.broker_max_outage_seconds as u64);
    let mut outage_since: Option<Instant> = None;
    let mut delay = Duration::from_millis(250);
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        if shared.shutting_down() {
            return Ok(());
        }
        let why = match session(&shared, &mut outage_since).await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Ok(SessionEnd::Lost(why)) => why,
            Err(e) => e.to_string(),
        };
        shared.broker_connected.store(false, Ordering::SeqCst);
        *shared.publish_channel.write().await = None;
        if outage_since.is_none() {
            delay = Duration::from_millis(250); // a fresh outage: back off from the start
        }
        metrics::counter!("audotics_broker_reconnects_total").increment(1);
        let since = *outage_since.get_or_insert_with(Instant::now);
        if since.elapsed() > max_outage {
            anyhow::bail!("RabbitMQ unreachable for {:?} (last error: {why})", since.elapsed());
        }
        let sleep = delay.mul_f64(rand::rng().random_range(0.5..1.5));
        warn!(error.message = %why, retry_in = ?sleep, "broker session lost; reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// One connection: declare, consume until shutdown or until the connection is lost for good.
async fn session(shared: &Arc<Shared>, outage_since: &mut Option<Instant>) -> anyhow::Result<SessionEnd> {
    let connection = broker::connect(&shared.broker).await?;
    let topology = broker::declare_topology(&connection, &shared.broker, &shared.settings.models).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(shared.broker.prefetch, BasicQosOptions::default()).await?;
    let mut queues: Vec<(String, Source)> =
        shared.settings.models.iter().map(|m| (broker::model_queue(m), Source::ModelQueue)).collect();
    queues.push((broker::UNROUTED_QUEUE.to_string(), Source::Unrouted));
    if topology.legacy_queue {
        queues.push((broker::LEGACY_RETRAIN_QUEUE.to_string(), Source::Legacy));
    }
    let mut tags = Vec::new();
    let mut streams = Vec::new();
    for (queue, source) in &queues {
        let tag = format!("{}-{}", shared.worker_id, uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let source = *source;
        streams.push(consumer.map(move |d| (source, d)).boxed());
        tags.push(tag);
    }
    let mut consumer = futures::stream::select_all(streams);
    *shared.publish_channel.write().await = Some(broker::confirm_channel(&connection).await?);
    shared.broker_connected.store(true, Ordering::SeqCst);
    shared.outbox_wake.notify_one();
    *outage_since = None;
    let names: Vec<&str> = queues.iter().map(|(q, _)| q.as_str()).collect();
    info!(queues = ?names, prefetch = shared.broker.prefetch, "consuming");
    let mut shutdown = shared.shutdown.subscribe();
    // The consumer stream does not always end when the broker goes away (seen with RabbitMQ 3.10:
    // CONNECTION_FORCED, then silence), so the connection's state is watched too.
    let mut watchdog = tokio::time::interval(Duration::from_millis(500));
    // The topology is declared again now and then: an exchange or binding deleted by hand (or by a
    // broker whose definitions were reset) would otherwise leave requests unroutable until every
    // worker reconnected. Idempotent, a few round trips.
    let mut redeclare = tokio::time::interval(TOPOLOGY_REFRESH);
    redeclare.tick().await; // the first tick is now: just declared
    let end = loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => {
                info!("shutdown: cancelling the consumers");
                for tag in &tags {
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                }
                let _ = connection.close(200, "worker shutting down".into()).await;
                return Ok(SessionEnd::Shutdown);
            }
            _ = watchdog.tick() => {
                if !connection.status().connected() {
                    break SessionEnd::Lost(format!("connection lost (state {})", state_of(&connection)));
                }
                // A publish the broker refused at channel level (e.g. NOT_FOUND: the events exchange
                // was deleted) closes the publishing channel alone: open another on this connection.
                if let Err(e) = renew_publish_channel(shared, &connection).await {
                    break SessionEnd::Lost(format!("cannot open a publishing channel: {e}"));
                }
            }
            _ = redeclare.tick() => {
                if let Err(e) = broker::declare_topology(&connection, &shared.broker, &shared.settings.models).await {
                    break SessionEnd::Lost(format!("cannot declare the topology again: {e}"));
                }
            }
            next = consumer.next() => match next {
                Some((source, Ok(delivery))) => {
                    let disposition = handle(shared, source, &delivery).await;
                    settle(shared, &delivery, disposition).await;
                }
                Some((_, Err(e))) => break SessionEnd::Lost(format!("consumer error: {e}")),
                None => break SessionEnd::Lost("the consumer stream ended".into()),
            }
        }
    };
    let _ =
        tokio::time::timeout(Duration::from_secs(2), connection.close(200, "rebuilding the connection".into())).await;
    Ok(end)
}

/// How often a session declares its topology again.
const TOPOLOGY_REFRESH: Duration = Duration::from_secs(10);

/// Replaces the publishing channel when the broker closed it.
async fn renew_publish_channel(shared: &Shared, connection: &lapin::Connection) -> anyhow::Result<()> {
    let closed = match shared.publish_channel.read().await.as_ref() {
        Some(channel) => !channel.status().connected(),
        None => true,
    };
    if closed {
        warn!("the publishing channel was closed by the broker; opening another");
        metrics::counter!("audotics_publish_channels_renewed_total").increment(1);
        *shared.publish_channel.write().await = Some(broker::confirm_channel(connection).await?);
        shared.outbox_wake.notify_one();
    }
    Ok(())
}

fn state_of(connection: &lapin::Connection) -> &'static str {
    let s = connection.status();
    match () {
        _ if s.connected() => "connected",
        _ if s.reconnecting() => "reconnecting",
        _ if s.connecting() => "connecting",
        _ if s.closing() => "closing",
        _ if s.closed() => "closed",
        _ if s.errored() => "error",
        _ => "unknown",
    }
}

/// Which queue a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The queue of a model this worker serves.
    ModelQueue,
    /// The alternate exchange's queue: no worker's queue was bound for the request's model when
    /// it was published.
    Unrouted,
    /// The earlier releases' single queue, being drained.
    Legacy,
}

/// What becomes of one delivery once [`handle`] has looked at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Disposition {
    /// Recorded in the database (or a duplicate of a recorded one): ack it.
    Ack,
    /// Not recorded (shutdown came first): hand it back for another worker.
    Requeue,
    /// Invalid: to the dead-letter exchange with its reason, then ack it.
    DeadLetter { reason: &'static str, detail: String },
    /// A request for another pool drained from the legacy queue: publish it again, routed by model.
    Reroute,
}

/// One delivery, decided and recorded: parsed and admitted, then recorded in the database (retrying
/// while the database is unreachable). The broker side is [`settle`]'s.
async fn handle(shared: &Arc<Shared>, source: Source, delivery: &Delivery) -> Disposition {
    let message_id = delivery.properties.message_id().as_ref().map(|s| s.as_str());
    let parsed = request::parse(&delivery.data, message_id, &shared.settings.models)
        .and_then(|r| admission::check_batch_fits(r, shared.memory_budget, shared.settings.runs.config.loss.kind));
    match parsed {
        Err(invalid) => refusal(source, invalid, delivery.routing_key.as_str()),
        Ok(request) => {
            let span = info_span!("retrain_request", event_id = %request.event_id, model = %request.model);
            record(shared, delivery.redelivered, request).instrument(span).await
        }
    }
}

/// What to do with a request that fails parsing or admission: a request drained from the legacy
/// queue for a model no queue of this worker serves is another pool's, and is re-routed; anything
/// else is dead-lettered with its reason.
fn refusal(source: Source, mut invalid: request::InvalidRequest, routing_key: &str) -> Disposition {
    if invalid.reason == request::InvalidReason::UnknownModel {
        match source {
            Source::Legacy => return Disposition::Reroute,
            Source::Unrouted => {
                invalid.detail =
                    format!("{} (no worker serves it: no queue is bound for {routing_key})", invalid.detail)
            }
            Source::ModelQueue => {}
        }
    }
    Disposition::DeadLetter { reason: invalid.reason.as_str(), detail: invalid.detail }
}

/// Carries out `disposition` on the broker. A republish that fails requeues the delivery instead.
async fn settle(shared: &Shared, delivery: &Delivery, disposition: Disposition) {
    let message_id = delivery.properties.message_id().as_ref().map(|s| s.as_str());
    match disposition {
        Disposition::Ack => ack(delivery).await,
        Disposition::Requeue => requeue(delivery).await,
        Disposition::Reroute => {
            // Another pool's request, left on the old shared queue: route it by model like a new one.
            metrics::counter!("audotics_legacy_requests_rerouted_total").increment(1);
            info!(routing_key = %delivery.routing_key, "re-routing a request from the legacy queue by model");
            republish(shared, delivery, message_id, broker::RETRAIN_EXCHANGE, None).await;
        }
        Disposition::DeadLetter { reason, detail } => {
            metrics::counter!("audotics_retrain_requests_total", "outcome" => "dead_lettered").increment(1);
            metrics::counter!("audotics_dead_letters_total", "reason" => reason).increment(1);
            warn!(
                reason,
                detail = %detail,
                routing_key = %delivery.routing_key,
                bytes = delivery.data.len(),
                "dead-lettering an invalid retrain request"
            );
            let headers = broker::dead_letter_headers(delivery.properties.headers().as_ref(), reason, &detail);
            republish(shared, delivery, message_id, DEAD_LETTER_EXCHANGE, Some(headers)).await;
        }
    }
}

/// Publishes the delivery's body (same routing key) to `exchange` with confirms, then acks it.
async fn republish(
    shared: &Shared,
    delivery: &Delivery,
    message_id: Option<&str>,
    exchange: &str,
    headers: Option<FieldTable>,
) {
    let headers = headers.or_else(|| delivery.properties.headers().clone());
    let channel = shared.publish_channel.read().await.clone();
    let published = match channel {
        Some(ch) => broker::publish_json(
            &ch,
            exchange,
            delivery.routing_key.as_str(),
            &delivery.data,
            message_id.unwrap_or_default(),
            headers,
        )
        .await
        .map_err(|e| e.to_string()),
        None => Err("no publishing channel".to_string()),
    };
    match published {
        Ok(_) => ack(delivery).await,
        Err(e) => {
            // Requeued: the publish is retried on redelivery (and RabbitMQ's delivery limit
            // dead-letters the message itself if this keeps failing).
            warn!(error.message = %e, exchange, "cannot republish the message; requeueing it");
            requeue(delivery).await;
        }
    }
}

/// Records the request, retrying while the database is unreachable; on shutdown before it is
/// recorded, [`Disposition::Requeue`] hands it to another worker.
async fn record(shared: &Arc<Shared>, redelivered: bool, request: RetrainRequest) -> Disposition {
    let mut delay = Duration::from_millis(200);
    let recorded = loop {
        match super::runner::bounded(shared.lease(), coord::record_request(&shared.pool, &request)).await {
            Ok(r) => break r,
            Err(e) => {
                metrics::counter!("audotics_database_errors_total", "operation" => "record_request").increment(1);
                if shared.shutting_down() {
                    warn!(error.message = %e, "shutdown before the request was recorded; requeueing it");
                    return Disposition::Requeue;
                }
                warn!(error.message = %e, retry_in = ?delay, "cannot record the request; retrying");
                tokio::time::sleep(delay.mul_f64(rand::rng().random_range(0.5..1.5))).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let outcome = match &recorded {
        Recorded::Pending => "pending",
        Recorded::Duplicate => "duplicate",
        Recorded::Satisfied { .. } => "satisfied",
    };
    metrics::counter!("audotics_retrain_requests_total", "outcome" => outcome).increment(1);
    info!(outcome, redelivered, reason = request.reason.as_deref().unwrap_or(""), "retrain request recorded");
    match recorded {
        Recorded::Pending => shared.scheduler_wake.notify_one(),
        Recorded::Satisfied { .. } => shared.outbox_wake.notify_one(),
        Recorded::Duplicate => {}
    }
    Disposition::Ack
}

async fn requeue(delivery: &Delivery) {
    if let Err(e) = delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await {
        warn!(error.message = %e, "nack failed; the message will be redelivered when its channel closes");
    }
}

async fn ack(delivery: &Delivery) {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        // The channel was recovered since this delivery: RabbitMQ will redeliver it, and the
        // redelivery is recognised as a duplicate.
        Ok(false) => warn!("ack on a channel from before recovery; the message will be redelivered"),
        Err(e) => warn!(error.message = %e, "ack failed; the message will be redelivered"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::request::{InvalidReason, InvalidRequest};

    fn invalid(reason: InvalidReason) -> InvalidRequest {
        InvalidRequest { reason, detail: "model \"jazz\" is not served".into() }
    }

    #[test]
    fn another_pools_request_drained_from_the_legacy_queue_is_rerouted() {
        let d = refusal(Source::Legacy, invalid(InvalidReason::UnknownModel), "retrain.jazz");
        assert_eq!(d, Disposition::Reroute);
    }

    #[test]
    fn an_unrouted_request_is_dead_lettered_saying_no_worker_serves_it() {
        let d = refusal(Source::Unrouted, invalid(InvalidReason::UnknownModel), "retrain.jazz");
        assert_eq!(
            d,
            Disposition::DeadLetter {
                reason: "unknown_model",
                detail: "model \"jazz\" is not served (no worker serves it: no queue is bound for retrain.jazz)".into()
            }
        );
    }

    #[test]
    fn other_invalid_requests_are_dead_lettered_with_their_reason_whatever_the_queue() {
        for source in [Source::ModelQueue, Source::Unrouted, Source::Legacy] {
            let d = refusal(source, invalid(InvalidReason::InvalidParams), "retrain.content-based");
            assert_eq!(
                d,
                Disposition::DeadLetter { reason: "invalid_params", detail: "model \"jazz\" is not served".into() }
            );
        }
        let d = refusal(Source::ModelQueue, invalid(InvalidReason::UnknownModel), "retrain.jazz");
        assert!(
            matches!(d, Disposition::DeadLetter { reason: "unknown_model", ref detail } if !detail.contains("no queue"))
        );
    }
}
