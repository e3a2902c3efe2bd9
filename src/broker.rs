//! RabbitMQ: the contract's topology, connecting, and publishing with confirms. The worker's consumer loop lives in [`crate::worker`]; this module owns the client.
//!
//! Topology (declared idempotently by every worker and by `retrain`):
//! - exchange `audotics.events` (topic, durable): `retrain.<model>` in, `model-ready.<model>`,
//!   `model-rejected.<model>`, `model-failed.<model>` out;
//! - quorum queue `audotics.retrain` bound with `retrain.*`, with `x-delivery-limit` and
//!   dead-lettering to exchange `audotics.dead-letter` (topic) → quorum queue `audotics.retrain.dead`.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

pub const EVENTS_EXCHANGE: &str = "audotics.events";
pub const DEAD_LETTER_EXCHANGE: &str = "audotics.dead-letter";
pub const RETRAIN_QUEUE: &str = "audotics.retrain";
pub const DEAD_LETTER_QUEUE: &str = "audotics.retrain.dead";
pub const REASON_HEADER: &str = "x-audotics-dead-letter-reason";
pub const DETAIL_HEADER: &str = "x-audotics-dead-letter-detail";

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// Deliveries after which RabbitMQ itself dead-letters a message (a poison message that crashes
    /// workers). Changing it on a live queue needs a policy or a new queue: RabbitMQ refuses to
    /// redeclare a queue with other arguments.
    pub delivery_limit: i64,
    /// Unacknowledged deliveries per consumer.
    pub prefetch: u16,
    /// Name shown in the management UI.
    pub connection_name: String,
}

/// Why a broker call failed. Every variant is transient from the worker's point of view: the
/// supervisor reconnects; only a connection that cannot be re-established for long exits.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("RabbitMQ call failed: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ refused (nacked) the message published to {routing_key}")]
    Nacked { routing_key: String },
}

/// Opens a connection. Without lapin's automatic recovery: a dropped connection stays dropped and
/// its owner builds a new one (see [`crate::worker`]'s supervisor for why).
pub async fn connect(settings: &BrokerSettings) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(settings.connection_name.clone().into());
    Connection::connect(&settings.url, props)
        .await
        .map_err(|source| BrokerError::Connect { url: crate::db::redact_url(&settings.url), source })
}

/// Declares the contract's exchanges, queues and bindings (idempotent).
pub async fn declare_topology(channel: &Channel, settings: &BrokerSettings) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare(EVENTS_EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    channel.exchange_declare(DEAD_LETTER_EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    let mut dead_args = FieldTable::default();
    dead_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel.queue_declare(DEAD_LETTER_QUEUE.into(), QueueDeclareOptions::durable(), dead_args).await?;
    channel
        .queue_bind(
            DEAD_LETTER_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(settings.delivery_limit));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()));
    channel.queue_declare(RETRAIN_QUEUE.into(), QueueDeclareOptions::durable(), args).await?;
    channel
        .queue_bind(
            RETRAIN_QUEUE.into(),
            EVENTS_EXCHANGE.into(),
            "retrain.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// A channel in confirm mode.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// What became of a confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Routed to at least one queue and confirmed.
    Routed,
    /// Confirmed, but no queue is bound for the routing key (returned under `mandatory`).
    Unroutable,
}

/// Publishes a persistent JSON message with `mandatory` and waits for the broker's confirm.
pub async fn publish_json(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    message_id: &str,
    headers: Option<FieldTable>,
) -> Result<Delivered, BrokerError> {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64);
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            body,
            props,
        )
        .await?
        .await?;
    if confirm.is_nack() {
        return Err(BrokerError::Nacked { routing_key: routing_key.to_string() });
    }
    Ok(if confirm.take_message().is_some() { Delivered::Unroutable } else { Delivered::Routed })
}

/// Headers naming why a message was dead-lettered, added to its original headers.
pub fn dead_letter_headers(original: Option<&FieldTable>, reason: &str, detail: &str) -> FieldTable {
    let mut headers = original.cloned().unwrap_or_default();
    headers.insert(ShortString::from(REASON_HEADER), AMQPValue::LongString(reason.into()));
    // Header values are bounded to keep the message small whatever the parser said.
    let detail: String = detail.chars().take(1000).collect();
    headers.insert(ShortString::from(DETAIL_HEADER), AMQPValue::LongString(detail.into()));
    headers
}
