//! RabbitMQ: the contract's topology, connecting, and publishing with confirms. The worker's consumer loop lives in [`crate::worker`]; this module owns the client.
//!
//! Topology (declared idempotently by every worker and by `retrain`):
//! - exchange `audotics.events` (topic, durable): `retrain.<model>` in, `model-ready.<model>`,
//!   `model-rejected.<model>`, `model-failed.<model>` out;
//! - exchange `audotics.retrain` (topic), bound to `audotics.events` with `retrain.*`, routes each
//!   request by model to the quorum queue `audotics.retrain.model.<model>` that every worker serving
//!   that model declares and consumes (so pods serving different model sets — a rolling update, CPU
//!   and GPU pools — never receive each other's requests). A request for a model no worker has ever
//!   declared goes to its alternate exchange `audotics.retrain.unrouted` (fanout) → quorum queue
//!   `audotics.retrain.unrouted`, which every worker consumes and dead-letters as `unknown_model`;
//! - every retrain queue has `x-delivery-limit` and dead-letters to exchange `audotics.dead-letter`
//!   (topic) → quorum queue `audotics.retrain.dead`, bounded by `x-max-length` /
//!   `x-max-length-bytes` with `x-overflow: drop-head` (a full dead-letter queue drops its oldest);
//! - the queue of earlier releases, `audotics.retrain` (every model on one queue), is unbound from
//!   `audotics.events` when found and drained: its requests are handled, or re-routed by model.
//!
//! Inbound size: lapin buffers a whole message body before delivering it and offers no limit, so the
//! bound before buffering is the broker's `max_message_size` (1 MiB in docker-compose.yml; the
//! broker's configuration elsewhere); the worker refuses bodies over 64 KiB once received
//! (`oversized`).

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

pub const EVENTS_EXCHANGE: &str = "audotics.events";
pub const DEAD_LETTER_EXCHANGE: &str = "audotics.dead-letter";
/// Routes requests by model (see the module's topology).
pub const RETRAIN_EXCHANGE: &str = "audotics.retrain";
/// Alternate exchange of [`RETRAIN_EXCHANGE`], and its queue: requests no worker's queue takes.
pub const UNROUTED_EXCHANGE: &str = "audotics.retrain.unrouted";
pub const UNROUTED_QUEUE: &str = "audotics.retrain.unrouted";
/// The single retrain queue of earlier releases: drained, no longer bound.
pub const LEGACY_RETRAIN_QUEUE: &str = "audotics.retrain";
pub const DEAD_LETTER_QUEUE: &str = "audotics.retrain.dead";
/// `x-max-length-bytes` of the dead-letter queue (its message bound is a setting).
pub const DEAD_LETTER_MAX_BYTES: i64 = 512 << 20;
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
    /// `x-max-length` of the dead-letter queue; past it the oldest dead letter is dropped.
    pub dead_letter_max_messages: i64,
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
        .map_err(|source| BrokerError::Connect { url: crate::system::telemetry::redact_url(&settings.url), source })
}

/// The queue of `model`'s requests.
pub fn model_queue(model: &str) -> String {
    format!("audotics.retrain.model.{model}")
}

/// What [`declare_topology`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// The earlier releases' single queue exists (and is now unbound): consume it until empty.
    pub legacy_queue: bool,
}

/// Declares the contract's exchanges, queues and bindings, and the queue of each of `models`
/// (idempotent). On channels of its own: a refused declaration closes its channel.
pub async fn declare_topology(
    connection: &Connection,
    settings: &BrokerSettings,
    models: &[String],
) -> Result<Topology, BrokerError> {
    let channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    let none = FieldTable::default;
    channel.exchange_declare(EVENTS_EXCHANGE.into(), ExchangeKind::Topic, durable, none()).await?;
    channel.exchange_declare(DEAD_LETTER_EXCHANGE.into(), ExchangeKind::Topic, durable, none()).await?;
    channel.exchange_declare(UNROUTED_EXCHANGE.into(), ExchangeKind::Fanout, durable, none()).await?;
    let mut alternate = FieldTable::default();
    alternate.insert("alternate-exchange".into(), AMQPValue::LongString(UNROUTED_EXCHANGE.into()));
    channel.exchange_declare(RETRAIN_EXCHANGE.into(), ExchangeKind::Topic, durable, alternate).await?;
    channel
        .exchange_bind(
            RETRAIN_EXCHANGE.into(),
            EVENTS_EXCHANGE.into(),
            "retrain.*".into(),
            ExchangeBindOptions::default(),
            none(),
        )
        .await?;
    let mut queues = vec![(UNROUTED_QUEUE.to_string(), UNROUTED_EXCHANGE, String::new())];
    queues.extend(models.iter().map(|m| (model_queue(m), RETRAIN_EXCHANGE, format!("retrain.{m}"))));
    for (queue, exchange, key) in queues {
        let options = QueueDeclareOptions::durable();
        channel.queue_declare(queue.as_str().into(), options, retrain_queue_args(settings)).await?;
        channel.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), none()).await?;
    }
    let _ = channel.close(200, "topology declared".into()).await;
    declare_dead_letter_queue(connection, settings).await?;
    let legacy_queue = unbind_legacy_queue(connection).await?;
    Ok(Topology { legacy_queue })
}

fn retrain_queue_args(settings: &BrokerSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(settings.delivery_limit));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()));
    args
}

/// Declares the bounded dead-letter queue, on channels of its own (a refused declaration closes its
/// channel). One from an earlier release (unbounded), or with another bound, is used as it is:
/// RabbitMQ refuses to redeclare a queue with other arguments, and changing that one takes an
/// operator's policy. Either way the queue is bound. The gauge
/// `audotics_dead_letter_queue_unbounded` says which; the warning is logged once per process (the
/// topology is declared again every few seconds).
async fn declare_dead_letter_queue(connection: &Connection, settings: &BrokerSettings) -> Result<(), BrokerError> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(settings.dead_letter_max_messages));
    args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(DEAD_LETTER_MAX_BYTES));
    args.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
    let bounded = match channel.queue_declare(DEAD_LETTER_QUEUE.into(), QueueDeclareOptions::durable(), args).await {
        Ok(_) => true,
        Err(e) if is_precondition_failed(&e) => {
            WARNED.call_once(|| tracing::warn!(
                queue = DEAD_LETTER_QUEUE,
                "the dead-letter queue exists with other arguments (an earlier release's, without a length limit, \
                 or another DEAD_LETTER_MAX_MESSAGES); it is used as it is; to bound it, apply a policy: rabbitmqctl set_policy audotics-dead-letter '^audotics\\.retrain\\.dead$' \
                 '{{\"max-length\":{},\"overflow\":\"drop-head\"}}' --apply-to queues",
                settings.dead_letter_max_messages
            ));
            false
        }
        Err(e) => return Err(e.into()),
    };
    metrics::gauge!("audotics_dead_letter_queue_unbounded").set(if bounded { 0.0 } else { 1.0 });
    let channel = match bounded {
        true => channel,
        false => connection.create_channel().await?, // the refusal closed the first one
    };
    channel
        .queue_bind(
            DEAD_LETTER_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "dead-letter queue declared".into()).await;
    Ok(())
}

/// Unbinds the earlier releases' single queue from `audotics.events` if it exists (so new requests
/// are routed by model); true when it exists.
async fn unbind_legacy_queue(connection: &Connection) -> Result<bool, BrokerError> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(LEGACY_RETRAIN_QUEUE.into(), passive, FieldTable::default()).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    channel
        .queue_unbind(LEGACY_RETRAIN_QUEUE.into(), EVENTS_EXCHANGE.into(), "retrain.*".into(), FieldTable::default())
        .await?;
    let _ = channel.close(200, "legacy queue unbound".into()).await;
    Ok(true)
}

fn soft_error_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

fn is_precondition_failed(e: &lapin::Error) -> bool {
    soft_error_code(e) == Some(406)
}

fn is_not_found(e: &lapin::Error) -> bool {
    soft_error_code(e) == Some(404)
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
