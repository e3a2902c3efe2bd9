//! The `worker` flags, turned into the worker's plain [`WorkerSettings`].

use clap::Args;

use super::train_args::TrainArgs;
use super::values::{at_least_one, model_binding, non_negative_finite};
use crate::training::model::ModelKind;
use crate::training::resources::{Limit, parse_limit};
use crate::worker::WorkerSettings;

/// The `worker` flags; training settings (and the database and store) come from the flattened
/// train flags, which are the defaults every run starts from.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// RabbitMQ URL (`amqp://user:pass@host:port/vhost`).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Model keys this worker trains (comma-separated), each `key` (the content kind) or `key=kind`
    /// (content, collaborative, hybrid), e.g. `content-based,hybrid=hybrid`; requests for other keys
    /// are dead-lettered.
    #[arg(long, env = "WORKER_MODELS", value_delimiter = ',', default_value = "content-based", value_parser = model_binding)]
    pub models: Vec<(String, ModelKind)>,
    /// This worker's name in leases and logs (default: host name and process id).
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// A run's lease: a worker that stops heartbeating loses its run after this long.
    #[arg(long, env = "WORKER_LEASE_SECONDS", default_value_t = 60, value_parser = at_least_one)]
    pub lease_seconds: usize,
    /// On SIGTERM, exit within this many seconds (checkpoint, release the lease, flush events).
    #[arg(long, env = "WORKER_GRACE_SECONDS", default_value_t = 60, value_parser = at_least_one)]
    pub grace_seconds: usize,
    /// Quality gate: publish only if Recall@10 is at most this much below the current version's.
    #[arg(long, env = "QUALITY_TOLERANCE", default_value_t = 0.02, value_parser = non_negative_finite)]
    pub quality_tolerance: f64,
    /// Attempts of a failing run before it is marked failed and announced.
    #[arg(long, env = "RUN_MAX_ATTEMPTS", default_value_t = 3, value_parser = at_least_one)]
    pub max_attempts: usize,
    /// A run still going this long after it was first claimed (all attempts together) is stopped at
    /// a batch boundary and failed (`model-failed`, outcome `deadline`).
    #[arg(long, env = "RUN_MAX_SECONDS", default_value_t = 6 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub run_max_seconds: u64,
    /// Delay before retrying a failed attempt (doubled per attempt, jittered).
    #[arg(long, env = "RUN_RETRY_SECONDS", default_value_t = 30)]
    pub retry_seconds: u64,
    /// `x-delivery-limit` of the retrain queues (must match the live queues').
    #[arg(long, env = "RETRAIN_DELIVERY_LIMIT", default_value_t = 5, value_parser = at_least_one)]
    pub delivery_limit: usize,
    /// `x-max-length` of the dead-letter queue `audotics.retrain.dead` (must match the live queue's);
    /// when full, RabbitMQ drops its oldest dead letter (`x-overflow: drop-head`).
    #[arg(long, env = "DEAD_LETTER_MAX_MESSAGES", default_value_t = 100_000, value_parser = at_least_one)]
    pub dead_letter_max_messages: usize,
    /// Unacknowledged deliveries at a time.
    #[arg(long, env = "RETRAIN_PREFETCH", default_value_t = 50, value_parser = at_least_one)]
    pub prefetch: usize,
    /// How often to look for runs to claim when nothing wakes the scheduler.
    #[arg(long, env = "WORKER_POLL_SECONDS", default_value_t = 2, value_parser = at_least_one)]
    pub poll_seconds: usize,
    /// Exit non-zero when RabbitMQ stays unreachable this long (the orchestrator restarts the pod).
    #[arg(long, env = "BROKER_MAX_OUTAGE_SECONDS", default_value_t = 600, value_parser = at_least_one)]
    pub broker_max_outage_seconds: usize,
    /// Memory this worker's runs may use (`3GiB`, `512MiB`, `2G`); `auto` (or empty): the cgroup's memory
    /// limit, else `RLIMIT_AS`, else physical memory. A run whose estimated peak exceeds it is
    /// refused (`model-failed`, outcome `resource_limit`); a request whose batch alone exceeds it is
    /// dead-lettered (`invalid_params`).
    #[arg(long, env = "WORKER_MEMORY_LIMIT", default_value = "auto", value_parser = parse_limit)]
    pub memory_limit: Limit,
    /// Failed publishes of one outbox event before it is parked (kept, with its error, for an
    /// operator) so that it no longer blocks the events behind it.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", default_value_t = 10, value_parser = at_least_one)]
    pub outbox_max_attempts: usize,
    /// Days the worker's state tables keep what ended (answered requests, published events,
    /// finished runs); older rows are pruned hourly. It is also the window `event_id` dedupes in.
    #[arg(long, env = "STATE_RETENTION_DAYS", default_value_t = 30, value_parser = at_least_one)]
    pub retention_days: usize,
    /// A worker whose clock is more than this many seconds off the database's claims no run (S3
    /// refuses requests signed more than 15 minutes off); 0: no check.
    #[arg(long, env = "WORKER_MAX_CLOCK_SKEW_SECONDS", default_value_t = 300)]
    pub max_clock_skew_seconds: u64,
    /// Every this many seconds, ask for a refresh (`params.refresh`: embed the new tracks with the
    /// latest version's weights, no training) of each content or hybrid model whose catalogue gained
    /// tracks since its latest version; 0: no timer.
    #[arg(long, env = "WORKER_REFRESH_EVERY_SECONDS", default_value_t = 0)]
    pub refresh_every_seconds: u64,
    /// Address of the health and metrics server.
    #[arg(long, env = "WORKER_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: String,
    #[command(flatten)]
    pub train: TrainArgs,
}

impl WorkerArgs {
    /// The worker's plain settings.
    pub fn settings(&self) -> WorkerSettings {
        WorkerSettings {
            amqp_url: self.amqp_url.clone(),
            models: self.models.iter().map(|(key, _)| key.clone()).collect(),
            model_kinds: self.models.iter().cloned().collect(),
            worker_id: self.worker_id.clone(),
            lease_seconds: self.lease_seconds,
            grace_seconds: self.grace_seconds,
            quality_tolerance: self.quality_tolerance,
            max_attempts: self.max_attempts,
            run_max_seconds: self.run_max_seconds,
            retry_seconds: self.retry_seconds,
            delivery_limit: self.delivery_limit,
            dead_letter_max_messages: self.dead_letter_max_messages,
            prefetch: self.prefetch,
            poll_seconds: self.poll_seconds,
            broker_max_outage_seconds: self.broker_max_outage_seconds,
            memory_limit: self.memory_limit.0,
            outbox_max_attempts: self.outbox_max_attempts,
            retention_days: self.retention_days,
            max_clock_skew_seconds: self.max_clock_skew_seconds,
            refresh_every_seconds: self.refresh_every_seconds,
            http_addr: self.http_addr.clone(),
            database_url: self.train.database_url.clone(),
            store_url: self.train.output.clone(),
            runs: self.train.run_defaults(true),
        }
    }
}
