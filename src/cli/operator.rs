//! Operator commands: `rollback` (point `latest.json` at an earlier, verified version) and
//! `replay-dead-letters` (inspect, or send back, what the worker or RabbitMQ dead-lettered).

use anyhow::Context;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::broker::{self, BrokerSettings, DEAD_LETTER_QUEUE, DETAIL_HEADER, EVENTS_EXCHANGE, REASON_HEADER};
use crate::publish::versions::{read_latest, read_manifest, verify, write_latest};
use crate::publish::{layout, store::ModelStore};

/// The versions of `model` that have a manifest (whole versions), oldest first.
pub async fn whole_versions(store: &ModelStore, model: &str) -> anyhow::Result<Vec<String>> {
    let keys = store.list(&layout::versions_dir(model)).await?;
    let mut versions: Vec<String> = keys
        .iter()
        .filter_map(|k| k.strip_suffix(&format!("/{}", layout::MANIFEST)))
        .filter_map(|dir| dir.rsplit('/').next().map(String::from))
        .collect();
    versions.sort();
    versions.dedup();
    Ok(versions)
}

/// Points `latest.json` at `to` (default: the newest whole version older than the current one),
/// after checking every artifact of it against its manifest. Returns `(from, to)`.
pub async fn rollback(store: &ModelStore, model: &str, to: Option<&str>) -> anyhow::Result<(Option<String>, String)> {
    let current = read_latest(store, model).await?.map(|l| l.version);
    let versions = whole_versions(store, model).await?;
    let target = match to {
        Some(v) => {
            anyhow::ensure!(
                versions.iter().any(|x| x == v),
                "version {v} of {model} has no manifest in {} (whole versions: {})",
                store.root_url(),
                versions.join(", ")
            );
            v.to_string()
        }
        None => {
            let current = current.as_deref().context("no latest.json: nothing to roll back from")?;
            versions
                .iter()
                .rev()
                .find(|v| v.as_str() < current)
                .cloned()
                .with_context(|| format!("no whole version older than {current}"))?
        }
    };
    let manifest_key = layout::version_object(model, &target, layout::MANIFEST);
    let bytes = store.get(&manifest_key).await?;
    let manifest = read_manifest(store, &manifest_key, None).await?;
    verify(store, &manifest).await.with_context(|| format!("version {target} is damaged; not rolling back to it"))?;
    write_latest(store, model, &target, &manifest_key, &crate::publish::versions::sha256_hex(&bytes)).await?;
    Ok((current, target))
}

/// One dead letter, as `replay-dead-letters` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub routing_key: String,
    pub message_id: Option<String>,
    /// The worker's reason header, or RabbitMQ's `x-death` reason (e.g. `delivery_limit`).
    pub reason: String,
    pub detail: String,
    pub body_excerpt: String,
}

/// Reads up to `limit` dead letters. With `replay`, each is republished (its original body and
/// routing key, without the dead-letter headers) to `audotics.events` with confirms and then acked;
/// otherwise every message is put back untouched (a dry run).
pub async fn replay_dead_letters(
    settings: &BrokerSettings,
    limit: usize,
    replay: bool,
) -> anyhow::Result<Vec<DeadLetter>> {
    let connection = broker::connect(settings).await?;
    broker::declare_topology(&connection, settings, &[]).await?;
    let channel = broker::confirm_channel(&connection).await?;
    let mut seen = Vec::new();
    let mut held = Vec::new();
    while seen.len() < limit {
        let Some(message) = channel.basic_get(DEAD_LETTER_QUEUE.into(), BasicGetOptions::default()).await? else {
            break;
        };
        let delivery = message.delivery;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let letter = DeadLetter {
            routing_key: delivery.routing_key.to_string(),
            message_id: delivery.properties.message_id().as_ref().map(|m| m.to_string()),
            reason: header(&headers, REASON_HEADER)
                .or_else(|| death_reason(&headers))
                .unwrap_or_else(|| "unknown".into()),
            detail: header(&headers, DETAIL_HEADER).unwrap_or_default(),
            body_excerpt: String::from_utf8_lossy(&delivery.data[..delivery.data.len().min(200)]).into_owned(),
        };
        if replay {
            let mut clean = FieldTable::default();
            for (k, v) in headers.inner() {
                if !matches!(
                    k.as_str(),
                    REASON_HEADER
                        | DETAIL_HEADER
                        | "x-death"
                        | "x-first-death-exchange"
                        | "x-first-death-queue"
                        | "x-first-death-reason"
                        | "x-last-death-exchange"
                        | "x-last-death-queue"
                        | "x-last-death-reason"
                ) {
                    clean.insert(k.clone(), v.clone());
                }
            }
            let id = letter.message_id.clone().unwrap_or_default();
            broker::publish_json(&channel, EVENTS_EXCHANGE, &letter.routing_key, &delivery.data, &id, Some(clean))
                .await?;
            delivery.ack(BasicAckOptions::default()).await?;
        } else {
            held.push(delivery);
        }
        seen.push(letter);
    }
    // A dry run returns everything it looked at, in order.
    for delivery in held.into_iter().rev() {
        delivery.nack(BasicNackOptions { multiple: false, requeue: true }).await?;
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(seen)
}

fn header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(&ShortString::from(name)) {
        Some(AMQPValue::LongString(s)) => Some(s.to_string()),
        Some(AMQPValue::ShortString(s)) => Some(s.to_string()),
        _ => None,
    }
}

/// The reason RabbitMQ recorded when it dead-lettered the message itself (`x-death[0].reason`).
fn death_reason(headers: &FieldTable) -> Option<String> {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get(&ShortString::from("x-death")) else {
        return header(headers, "x-first-death-reason");
    };
    match deaths.as_slice().first() {
        Some(AMQPValue::FieldTable(t)) => header(t, "reason"),
        _ => None,
    }
}
