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
                Some((source, Ok(delivery))) => handle(shared, source, delivery).await,
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

/// One delivery: dead-letter it, re-route it (a drained legacy request for a model this worker
/// does not serve), or record it and then ack it.
async fn handle(shared: &Arc<Shared>, source: Source, delivery: Delivery) {
    let message_id = delivery.properties.message_id().as_ref().map(|s| s.as_str().to_string());
    let parsed = request::parse(&delivery.data, message_id.as_deref(), &shared.settings.models)
        .and_then(|r| admission::check_batch_fits(r, shared.memory_budget, shared.settings.runs.config.loss.kind));
    match parsed {
        Err(rejected) if source == Source::Legacy && rejected.reason == request::InvalidReason::UnknownModel => {
            // Another pool's request, left on the old shared queue: route it by model like a new one.
            metrics::counter!("audotics_legacy_requests_rerouted_total").increment(1);
            info!(routing_key = %delivery.routing_key, "re-routing a request from the legacy queue by model");
            republish(shared, &delivery, message_id.as_deref(), broker::RETRAIN_EXCHANGE, None).await;
        }
        Err(mut rejected) => {
            if source == Source::Unrouted && rejected.reason == request::InvalidReason::UnknownModel {
                rejected.detail = format!(
                    "{} (no worker serves it: no queue is bound for {})",
                    rejected.detail, delivery.routing_key
                );
            }
            metrics::counter!("audotics_retrain_requests_total", "outcome" => "dead_lettered").increment(1);
            metrics::counter!("audotics_dead_letters_total", "reason" => rejected.reason.as_str()).increment(1);
            warn!(
                reason = rejected.reason.as_str(),
                detail = %rejected.detail,
                routing_key = %delivery.routing_key,
                bytes = delivery.data.len(),
                "dead-lettering an invalid retrain request"
            );
            dead_letter(shared, &delivery, message_id.as_deref(), rejected.reason.as_str(), &rejected.detail).await;
        }
        Ok(request) => {
            let span = info_span!("retrain_request", event_id = %request.event_id, model = %request.model);
            record_and_ack(shared, delivery, request).instrument(span).await;
        }
    }
}

async fn dead_letter(shared: &Shared, delivery: &Delivery, message_id: Option<&str>, reason: &str, detail: &str) {
    let headers = broker::dead_letter_headers(delivery.properties.headers().as_ref(), reason, detail);
    republish(shared, delivery, message_id, DEAD_LETTER_EXCHANGE, Some(headers)).await;
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
            let _ = delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await;
        }
    }
}

/// Records the request (retrying while the database is unreachable), then acks it. On shutdown
/// before it is recorded, it is requeued for another worker.
async fn record_and_ack(shared: &Arc<Shared>, delivery: Delivery, request: RetrainRequest) {
    let mut delay = Duration::from_millis(200);
    let recorded = loop {
        match super::runner::bounded(shared.lease(), coord::record_request(&shared.pool, &request)).await {
            Ok(r) => break r,
            Err(e) => {
                metrics::counter!("audotics_database_errors_total", "operation" => "record_request").increment(1);
                if shared.shutting_down() {
                    warn!(error.message = %e, "shutdown before the request was recorded; requeueing it");
                    let _ = delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await;
                    return;
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
    info!(
        outcome,
        redelivered = delivery.redelivered,
        reason = request.reason.as_deref().unwrap_or(""),
        "retrain request recorded"
    );
    ack(&delivery).await;
    match recorded {
        Recorded::Pending => shared.scheduler_wake.notify_one(),
        Recorded::Satisfied { .. } => shared.outbox_wake.notify_one(),
        Recorded::Duplicate => {}
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
