//! The command line: the commands, their flags and the validators that give each invalid value a
//! one-line error naming its flag. Every flag also reads an environment variable.

use clap::{Args, Parser, Subcommand};

use super::train_args::{SyntheticArgs, TrainArgs};
use super::values::{at_least_one, model_key};
use super::worker_args::WorkerArgs;
use crate::system::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(name = "audotics-trainer", version, about = "Trains the Audotics content-based track embedding model")]
pub struct Cli {
    /// Log format on stderr: text on a terminal and JSON otherwise (auto), or forced.
    #[arg(long, global = true, env = "AUDOTICS_LOG_FORMAT", value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// CPU threads for tensor maths (0 = auto: 1 when `train`, `worker` or `bench` trains batches of
    /// at most 512 pairs, where threading costs more than it gains; all cores otherwise).
    /// An explicit RAYON_NUM_THREADS wins.
    #[arg(long, global = true, env = "AUDOTICS_CPU_THREADS", default_value_t = 0)]
    pub cpu_threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model and write a new version (synthetic data unless a database is configured).
    Train(Box<super::train_args::TrainCommand>),
    /// Measure training throughput (pairs/s) and peak memory on synthetic data.
    Bench(crate::bench::BenchArgs),
    /// Measure building the exact similar-tracks table for a catalogue size (seconds, peak memory).
    BenchNeighbours(crate::bench::neighbours::NeighbourBenchArgs),
    /// Measure loading the platform's data: rows/s and peak memory (`bench/load.sh` runs it).
    BenchLoad(crate::bench::load::LoadBenchArgs),
    /// Create the trainer's own schema and tables (also done by every command that uses the database).
    Migrate(MigrateArgs),
    /// Create the platform's tables if absent and load demo data (synthetic, or the Spotify CSV).
    Seed(SeedArgs),
    /// Run the retrain worker: consume `retrain` requests, train, publish, announce `model-ready`.
    Worker(Box<WorkerArgs>),
    /// Publish a `retrain` request (what a platform service does; also for operators).
    Retrain(RetrainArgs),
    /// Point latest.json at an earlier version (verified against its manifest first).
    Rollback(RollbackArgs),
    /// Show the dead-letter queue (a dry run, the default), or send its messages back with --replay.
    ReplayDeadLetters(ReplayArgs),
    /// Reference baselines on a database seeded with --spotify-csv: raw features, popularity,
    /// same-subgenre and same-artist, on exactly the held-out split `train` uses with the same flags.
    SpotifyBaselines(Box<SpotifyBaselinesArgs>),
    /// The ceiling of the synthetic history: the generator's own probabilities rank each user's
    /// held-out listens (the Bayes-optimal ranker); a Bayes posterior that knows the generator's
    /// parameters but only each user's training tracks (the best a ranker can do from a history);
    /// and the baselines, on exactly the split `train` makes with the same flags.
    SyntheticCeiling(Box<TrainArgs>),
}

#[derive(Debug, Args)]
pub struct SpotifyBaselinesArgs {
    /// The CSV the database was seeded from (spotify_songs.csv, unzipped).
    #[arg(long, env = "AUDOTICS_SPOTIFY_CSV")]
    pub spotify_csv: std::path::PathBuf,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Args)]
pub struct RetrainArgs {
    /// RabbitMQ URL (`amqp://user:pass@host:port/vhost`).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// The model to retrain.
    #[arg(long, env = "AUDOTICS_MODEL", default_value = "content-based", value_parser = model_key)]
    pub model: String,
    /// Why (free text, recorded with the request).
    #[arg(long)]
    pub reason: Option<String>,
    /// The request's id (default: a new UUID).
    #[arg(long)]
    pub event_id: Option<String>,
    /// The newest interaction the model must include (RFC 3339); a published model that covers it
    /// answers at once.
    #[arg(long)]
    pub interactions_until: Option<String>,
    /// Training overrides as a JSON object, e.g. '{"epochs": 5}' (bounded; see docs/asyncapi.yaml).
    #[arg(long)]
    pub params: Option<String>,
    /// `x-delivery-limit` of the retrain queues, should this command be the one to declare them.
    #[arg(long, env = "RETRAIN_DELIVERY_LIMIT", default_value_t = 5, value_parser = at_least_one)]
    pub delivery_limit: usize,
    /// `x-max-length` of the dead-letter queue, should this command be the one to declare it.
    #[arg(long, env = "DEAD_LETTER_MAX_MESSAGES", default_value_t = 100_000, value_parser = at_least_one)]
    pub dead_letter_max_messages: usize,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Model store (path, file:// or s3://bucket/prefix).
    #[arg(long, env = "MODEL_STORE_URL", default_value = "./models")]
    pub output: String,
    #[arg(long, env = "AUDOTICS_MODEL", default_value = "content-based", value_parser = model_key)]
    pub model: String,
    /// The version to make current (default: the newest whole version older than the current one).
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// RabbitMQ URL (`amqp://user:pass@host:port/vhost`).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Look at (or replay) at most this many messages.
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    pub limit: usize,
    /// Republish the messages to audotics.events (and remove them from the dead-letter queue).
    /// Without it, a dry run: print them and leave them where they are.
    #[arg(long, default_value_t = false)]
    pub replay: bool,
    /// `x-delivery-limit` of the retrain queues, should this command be the one to declare them.
    #[arg(long, env = "RETRAIN_DELIVERY_LIMIT", default_value_t = 5, value_parser = at_least_one)]
    pub delivery_limit: usize,
    /// `x-max-length` of the dead-letter queue, should this command be the one to declare it.
    #[arg(long, env = "DEAD_LETTER_MAX_MESSAGES", default_value_t = 100_000, value_parser = at_least_one)]
    pub dead_letter_max_messages: usize,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL of the platform's database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// PostgreSQL URL of the platform's database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// Load the Spotify songs CSV (spotify_songs.csv, unzipped) instead of synthetic data.
    #[arg(long, env = "AUDOTICS_SPOTIFY_CSV")]
    pub spotify_csv: Option<std::path::PathBuf>,
    /// Seed of the synthetic generator.
    #[arg(long, env = "AUDOTICS_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Seed even when the platform's tables already hold rows (refused otherwise).
    #[arg(long, default_value_t = false)]
    pub force: bool,
    #[command(flatten)]
    pub synthetic: SyntheticArgs,
}
