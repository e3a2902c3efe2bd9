//! Command-line interface. Every flag also reads an environment variable (shown in `--help`).
//! Invalid values exit with status 2 and one line naming the flag.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::data::synthetic::SyntheticSpec;
use crate::device::DeviceChoice;
use crate::job::{self, DataSpec, MinimumSizes, PostgresSpec, RunOutcome, StopFlag, TrainJob};
use crate::loss::{LossConfig, LossKind};
use crate::model::EncoderConfig;
use crate::pairs::{DEFAULT_POSITIVE_KINDS, SamplingConfig};
use crate::storage::ModelStore;
use crate::telemetry::LogFormat;
use crate::train::{Holdout, TrainConfig};

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
    Train(Box<TrainArgs>),
    /// Measure training throughput (pairs/s) and peak memory on synthetic data.
    Bench(crate::bench::BenchArgs),
    /// Measure loading the platform's data: rows/s and peak memory (`bench/load.sh` runs it).
    BenchLoad(crate::bench_load::LoadBenchArgs),
    /// Create the trainer's own schema and tables (also done by every command that uses the database).
    Migrate(MigrateArgs),
    /// Create the platform's tables if absent and load demo data (synthetic, or the Spotify CSV).
    Seed(SeedArgs),
    /// Run the retrain worker: consume `retrain` requests, train, publish, announce `model-ready`.
    Worker(Box<crate::worker::WorkerArgs>),
    /// Publish a `retrain` request (what a platform service does; also for operators).
    Retrain(RetrainArgs),
    /// Point latest.json at an earlier version (verified against its manifest first).
    Rollback(RollbackArgs),
    /// Show the dead-letter queue (a dry run, the default), or send its messages back with --replay.
    ReplayDeadLetters(ReplayArgs),
    /// Reference baselines on a database seeded with --spotify-csv: raw features, popularity,
    /// same-subgenre and same-artist, on exactly the held-out split `train` uses with the same flags.
    SpotifyBaselines(Box<SpotifyBaselinesArgs>),
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

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training epochs.
    #[arg(long, env = "AUDOTICS_EPOCHS", default_value_t = 50, value_parser = at_least_one)]
    pub epochs: usize,
    /// Pairs per optimiser step (also the number of in-batch negatives + 1).
    #[arg(long, env = "AUDOTICS_BATCH_SIZE", default_value_t = 64, value_parser = at_least_one)]
    pub batch_size: usize,
    /// Share of each user's distinct positive tracks held out for evaluation, in (0, 1).
    #[arg(long, env = "AUDOTICS_VALIDATION_SPLIT", default_value_t = 0.2, value_parser = open_unit_interval, allow_negative_numbers = true)]
    pub validation_split: f64,
    /// Adam learning rate (> 0).
    #[arg(long, env = "AUDOTICS_LEARNING_RATE", default_value_t = 0.001, value_parser = positive_finite, allow_negative_numbers = true)]
    pub learning_rate: f64,
    /// Embedding size E (the first hidden layer has 2E units).
    #[arg(long, env = "AUDOTICS_EMBEDDING_SIZE", default_value_t = 64, value_parser = at_least_one)]
    pub embedding_size: usize,
    /// Seed for data generation, the split, initialisation, pair sampling and dropout.
    #[arg(long, env = "AUDOTICS_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Where to train: auto uses a GPU when the binary has CUDA and one is present.
    #[arg(long, env = "AUDOTICS_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Model store: a directory path, a file:// URL, or s3://bucket/prefix (S3 settings from AWS_*).
    #[arg(long, env = "MODEL_STORE_URL", default_value = "./models")]
    pub output: String,
    /// Model key: the top-level folder of the store.
    #[arg(long, env = "AUDOTICS_MODEL", default_value = "content-based", value_parser = model_key)]
    pub model: String,
    /// Training objective: contrastive (in-batch softmax) or cosine (the old, collapsing one).
    #[arg(long, env = "AUDOTICS_LOSS", value_enum, default_value = "contrastive")]
    pub loss: LossKind,
    /// Softmax temperature of the contrastive loss (> 0).
    #[arg(long, env = "AUDOTICS_TEMPERATURE", default_value_t = 0.05, value_parser = positive_finite, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Subtract log(popularity) from in-batch logits (logQ correction): true or false.
    #[arg(long, env = "AUDOTICS_LOGQ_CORRECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub logq_correction: bool,
    /// Weight of the penalty on the squared norm of each batch's mean embedding (0 = off): keeps
    /// embeddings from sharing one dominant direction.
    #[arg(long, env = "AUDOTICS_CENTERING_WEIGHT", default_value_t = 1.0, value_parser = non_negative_finite, allow_negative_numbers = true)]
    pub centering_weight: f64,
    /// Dropout rate after each hidden layer, in [0, 1).
    #[arg(long, env = "AUDOTICS_DROPOUT", default_value_t = 0.2, value_parser = dropout_rate, allow_negative_numbers = true)]
    pub dropout: f32,
    /// Partners drawn per anchor track per epoch.
    #[arg(long, env = "AUDOTICS_PAIRS_PER_TRACK", default_value_t = 5, value_parser = at_least_one)]
    pub pairs_per_track: usize,
    /// Cap on the pairs one user contributes per epoch.
    #[arg(long, env = "AUDOTICS_MAX_PAIRS_PER_USER", default_value_t = 500, value_parser = at_least_one)]
    pub max_pairs_per_user: usize,
    /// word2vec subsampling threshold for very popular tracks (0 = off; 1e-3 is a common value).
    #[arg(long, env = "AUDOTICS_SUBSAMPLE_THRESHOLD", default_value_t = 0.0, value_parser = non_negative_finite, allow_negative_numbers = true)]
    pub subsample_threshold: f64,
    /// Train on at most this many pairs per epoch, a uniform sample (0 = all).
    #[arg(long, env = "AUDOTICS_MAX_PAIRS_PER_EPOCH", default_value_t = 0)]
    pub max_pairs_per_epoch: usize,
    /// Interaction types that count as co-listening evidence (comma-separated).
    #[arg(long, env = "AUDOTICS_POSITIVE_TYPES", value_delimiter = ',', default_values_t = DEFAULT_POSITIVE_KINDS.map(String::from), value_parser = non_empty)]
    pub positive_types: Vec<String>,
    /// Evaluate at most this many users per epoch (a fixed seeded sample).
    #[arg(long, env = "AUDOTICS_EVAL_USERS", default_value_t = 5000, value_parser = at_least_one)]
    pub eval_users: usize,
    /// Validation loss over at most this many held-out pairs.
    #[arg(long, env = "AUDOTICS_MAX_VALIDATION_PAIRS", default_value_t = 20_000, value_parser = at_least_one)]
    pub max_validation_pairs: usize,
    /// Which listens are held out for evaluation: time (the newest share of the history; predict each
    /// user's next new tracks) or random (a seeded share of each user's tracks, for data without
    /// meaningful timestamps). Unset: time when training from the database, random otherwise.
    #[arg(long, env = "AUDOTICS_HOLDOUT", value_enum)]
    pub holdout: Option<Holdout>,
    /// Stop after this many epochs without a validation Recall@10 better than the best by more than
    /// --min-delta; the best epoch's weights are published either way (0: train every epoch).
    #[arg(long, env = "AUDOTICS_PATIENCE", default_value_t = 5)]
    pub patience: usize,
    /// The smallest Recall@10 gain that counts as an improvement (absolute, ≥ 0).
    #[arg(long, env = "AUDOTICS_MIN_DELTA", default_value_t = 0.0, value_parser = non_negative_finite, allow_negative_numbers = true)]
    pub min_delta: f64,
    /// Quality gate: a version is published only when its Recall@10 beats popularity and the raw
    /// features each by this share (0.1 = 10 %) and by two standard errors (≥ 0).
    #[arg(long, env = "AUDOTICS_MIN_LIFT", default_value_t = 0.1, value_parser = non_negative_finite, allow_negative_numbers = true)]
    pub min_lift: f64,
    /// Quality gate: whether the floors (popularity, raw features) decide publication: true or false.
    /// Off, they are still computed and recorded; for experiments and tests of the machinery.
    #[arg(long, env = "AUDOTICS_QUALITY_FLOORS", default_value_t = true, action = clap::ArgAction::Set)]
    pub quality_floors: bool,
    /// PostgreSQL URL of the platform's database; without it, training uses synthetic data.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// How published metadata, run.json and the model card name the database the data came from.
    /// Unset, they say only `postgres`: no host, user or database name leaves the trainer.
    #[arg(long, env = "AUDOTICS_DATA_SOURCE_LABEL", default_value = "postgres", value_parser = non_empty)]
    pub data_source_label: String,
    /// Also use playlist co-membership ("Playlist" / "_PlaylistToTrack") as co-occurrence: true or false.
    #[arg(long, env = "AUDOTICS_PLAYLISTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub playlists: bool,
    /// Minimum tracks with usable features; below it the run ends as "insufficient data".
    #[arg(long, env = "AUDOTICS_MIN_TRACKS", default_value_t = MinimumSizes::default().tracks)]
    pub min_tracks: usize,
    /// Minimum users with two or more positive tracks.
    #[arg(long, env = "AUDOTICS_MIN_USERS", default_value_t = MinimumSizes::default().users)]
    pub min_users: usize,
    /// Minimum usable interactions.
    #[arg(long, env = "AUDOTICS_MIN_INTERACTIONS", default_value_t = MinimumSizes::default().interactions)]
    pub min_interactions: usize,
    /// Versions to keep after a publish; older ones (never the one latest.json names) are deleted,
    /// with the checkpoints of finished runs except the newest run's.
    #[arg(long, env = "AUDOTICS_KEEP_VERSIONS", default_value_t = 10, value_parser = at_least_one)]
    pub keep_versions: usize,
    /// Checkpoints a run keeps while it trains (the newest; older ones are deleted as new ones land).
    #[arg(long, env = "AUDOTICS_KEEP_CHECKPOINTS", default_value_t = 2, value_parser = at_least_one)]
    pub keep_checkpoints: usize,
    /// Continue this run (by run id) from its newest checkpoint, with its stored settings.
    #[arg(long, env = "AUDOTICS_RESUME")]
    pub resume: Option<String>,
    /// Never draw a progress bar (one is drawn only when stderr is a terminal).
    #[arg(long, env = "AUDOTICS_NO_PROGRESS", default_value_t = false)]
    pub no_progress: bool,
    #[command(flatten)]
    pub synthetic: SyntheticArgs,
}

/// Sizes of the synthetic dataset (the embedded default when no database is configured).
#[derive(Debug, Args)]
pub struct SyntheticArgs {
    #[arg(long, env = "AUDOTICS_SYNTHETIC_TRACKS", default_value_t = SyntheticSpec::default().tracks, value_parser = at_least_one)]
    pub synthetic_tracks: usize,
    #[arg(long, env = "AUDOTICS_SYNTHETIC_USERS", default_value_t = SyntheticSpec::default().users, value_parser = at_least_one)]
    pub synthetic_users: usize,
    #[arg(long, env = "AUDOTICS_SYNTHETIC_INTERACTIONS", default_value_t = SyntheticSpec::default().interactions, value_parser = at_least_one)]
    pub synthetic_interactions: usize,
    /// Genre-like clusters the synthetic tracks are drawn around.
    #[arg(long, env = "AUDOTICS_SYNTHETIC_GENRES", default_value_t = SyntheticSpec::default().genres, value_parser = at_least_one)]
    pub synthetic_genres: usize,
}

impl SyntheticArgs {
    pub fn spec(&self, seed: u64) -> SyntheticSpec {
        SyntheticSpec {
            tracks: self.synthetic_tracks,
            users: self.synthetic_users,
            interactions: self.synthetic_interactions,
            genres: self.synthetic_genres,
            seed,
        }
    }
}

impl TrainArgs {
    /// The run settings these flags describe.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            validation_split: self.validation_split,
            learning_rate: self.learning_rate,
            encoder: EncoderConfig { embedding_size: self.embedding_size, dropout: self.dropout },
            loss: LossConfig {
                kind: self.loss,
                temperature: self.temperature,
                logq_correction: self.logq_correction,
                centering_weight: self.centering_weight,
            },
            sampling: SamplingConfig {
                pairs_per_track: self.pairs_per_track,
                max_pairs_per_user: self.max_pairs_per_user,
                subsample_threshold: self.subsample_threshold,
                max_pairs_per_epoch: self.max_pairs_per_epoch,
            },
            positive_kinds: self.positive_types.clone(),
            seed: self.seed,
            eval_users: self.eval_users,
            max_validation_pairs: self.max_validation_pairs,
            holdout: self.holdout.unwrap_or_default(),
            patience: self.patience,
            min_delta: self.min_delta,
        }
    }

    /// The run settings for data read from the platform's database (`from_database`) or not: the
    /// hold-out defaults to time-ordered for the database's timestamped history.
    pub fn train_config_for(&self, from_database: bool) -> TrainConfig {
        let holdout = match (self.holdout, from_database) {
            (Some(h), _) => h,
            (None, true) => Holdout::Time,
            (None, false) => Holdout::Random,
        };
        TrainConfig { holdout, ..self.train_config() }
    }
}

/// Parses the command line; on failure prints one line (or help/version) and returns the exit code.
pub fn parse() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = e.print();
                ExitCode::from(if e.use_stderr() { 2 } else { 0 })
            }
            _ => {
                let rendered = e.to_string();
                eprintln!("{}", rendered.lines().next().unwrap_or("error: invalid arguments"));
                ExitCode::from(2)
            }
        }
    })
}

impl Cli {
    /// The CPU thread count to use, or `None` to leave candle's default (all cores).
    pub fn cpu_threads(&self) -> Option<usize> {
        match (&self.command, self.cpu_threads) {
            (_, n) if n > 0 => Some(n),
            (Command::Train(t), _) if t.batch_size <= 512 => Some(1),
            // The pool is sized once per process: a request that raises its batch size keeps it.
            (Command::Worker(w), _) if w.train.batch_size <= 512 => Some(1),
            (Command::Bench(b), _) if b.batch_sizes.iter().all(|&size| size <= 512) => Some(1),
            _ => None,
        }
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Train(args) => train(*args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::BenchLoad(args) => crate::bench_load::run(args).await,
        Command::Migrate(args) => {
            let pool = crate::db::connect(&args.database_url).await?;
            crate::db::migrate(&pool).await?;
            println!("schema {} is up to date", crate::db::SCHEMA);
            Ok(ExitCode::SUCCESS)
        }
        Command::Seed(args) => seed(args).await,
        Command::SpotifyBaselines(args) => spotify_baselines(*args).await,
        Command::Worker(args) => crate::worker::run(*args).await,
        Command::Retrain(args) => retrain(args).await,
        Command::Rollback(args) => {
            let store = ModelStore::open(&args.output)?;
            let (from, to) = crate::ops::rollback(&store, &args.model, args.to.as_deref()).await?;
            println!("{}: latest.json {} → {to}", args.model, from.as_deref().unwrap_or("(none)"));
            Ok(ExitCode::SUCCESS)
        }
        Command::ReplayDeadLetters(args) => {
            let settings = crate::broker::BrokerSettings {
                url: args.amqp_url.clone(),
                delivery_limit: args.delivery_limit as i64,
                dead_letter_max_messages: args.dead_letter_max_messages as i64,
                prefetch: 1,
                connection_name: "audotics-trainer replay-dead-letters".into(),
            };
            let letters = crate::ops::replay_dead_letters(&settings, args.limit, args.replay).await?;
            for letter in &letters {
                println!("{}", serde_json::to_string(letter)?);
            }
            let action = if args.replay { "replayed" } else { "left in place (dry run; --replay sends them back)" };
            eprintln!("{} dead letters {action}", letters.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Publishes one `retrain` request with confirms; fails when no queue would receive it.
async fn retrain(args: RetrainArgs) -> anyhow::Result<ExitCode> {
    use crate::broker;
    let mut body = serde_json::json!({
        "schema_version": 1,
        "model": args.model,
        "event_id": args.event_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        "requested_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    if let Some(reason) = &args.reason {
        body["reason"] = reason.clone().into();
    }
    if let Some(until) = &args.interactions_until {
        chrono::DateTime::parse_from_rfc3339(until)
            .map_err(|e| anyhow::anyhow!("--interactions-until {until:?} is not RFC 3339: {e}"))?;
        body["interactions_until"] = until.clone().into();
    }
    if let Some(params) = &args.params {
        let value: serde_json::Value =
            serde_json::from_str(params).map_err(|e| anyhow::anyhow!("--params is not JSON: {e}"))?;
        body["params"] = value;
    }
    let bytes = serde_json::to_vec(&body)?;
    // Refuse here what the worker would dead-letter.
    crate::worker::request::parse(&bytes, None, std::slice::from_ref(&args.model))
        .map_err(|r| anyhow::anyhow!("invalid request ({}): {}", r.reason.as_str(), r.detail))?;
    let settings = broker::BrokerSettings {
        url: args.amqp_url.clone(),
        delivery_limit: args.delivery_limit as i64,
        dead_letter_max_messages: args.dead_letter_max_messages as i64,
        prefetch: 1,
        connection_name: "audotics-trainer retrain".into(),
    };
    let connection = broker::connect(&settings).await?;
    // No model queue: a model no worker serves is dead-lettered (`unknown_model`), not kept waiting.
    broker::declare_topology(&connection, &settings, &[]).await?;
    let channel = broker::confirm_channel(&connection).await?;
    let event_id = body["event_id"].as_str().unwrap_or_default().to_string();
    let routing_key = format!("retrain.{}", args.model);
    let delivered =
        broker::publish_json(&channel, broker::EVENTS_EXCHANGE, &routing_key, &bytes, &event_id, None).await?;
    let _ = connection.close(200, "done".into()).await;
    anyhow::ensure!(
        delivered == broker::Delivered::Routed,
        "no queue is bound for {routing_key}: request not delivered"
    );
    println!("{event_id}");
    Ok(ExitCode::SUCCESS)
}

async fn spotify_baselines(args: SpotifyBaselinesArgs) -> anyhow::Result<ExitCode> {
    let url = args.train.database_url.clone().ok_or_else(|| anyhow::anyhow!("--database-url is required"))?;
    let pool = crate::db::connect(&url).await?;
    let config = args.train.train_config_for(true);
    let options = crate::db::load::LoadOptions {
        playlists: args.train.playlists,
        positive_kinds: config.positive_kinds.clone(),
        interactions_until_ms: None,
        tracks_until_ms: None,
    };
    let dataset = crate::db::load::load(&pool, &options, &args.train.data_source_label).await?;
    let csv = args.spotify_csv.clone();
    let rows =
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(&'static str, crate::eval::RankingMetrics)>> {
            let labels = crate::spotify::TrackLabels::from_csv(&csv, &dataset.catalogue.track_ids)?;
            let data = crate::train::PreparedData::new(&dataset, &config, &candle_core::Device::Cpu)?;
            let trainer = crate::train::Trainer::new(&config, &data)?;
            let b = trainer.baselines()?;
            Ok(vec![
                ("random", b.random),
                ("raw standardised features", b.raw_features),
                ("popularity", b.popularity),
                ("item-based collaborative filtering", b.item_cf),
                ("same subgenre", crate::spotify::label_baseline(trainer.eval_set(), &labels.subgenres)),
                ("same artist", crate::spotify::label_baseline(trainer.eval_set(), &labels.artists)),
            ])
        })
        .await??;
    println!("| baseline | Recall@10 | ± | NDCG@10 | held-out (user, track) | users |");
    println!("|---|---|---|---|---|---|");
    for (name, m) in rows {
        let (r, se, ndcg) = (m.recall_at_10, m.recall_at_10_se, m.ndcg_at_10);
        println!("| {name} | {r:.4} | {se:.4} | {ndcg:.4} | {} | {} |", m.heldout, m.users);
    }
    Ok(ExitCode::SUCCESS)
}

async fn seed(args: SeedArgs) -> anyhow::Result<ExitCode> {
    let pool = crate::db::connect(&args.database_url).await?;
    let report = match &args.spotify_csv {
        Some(path) => {
            let path = path.clone();
            let rows = tokio::task::spawn_blocking(move || crate::seed::SeedRows::from_spotify_csv(&path)).await??;
            crate::seed::seed(&pool, rows, args.force).await?
        }
        None => {
            let spec = args.synthetic.spec(args.seed);
            let dataset = tokio::task::spawn_blocking(move || crate::data::synthetic::generate(&spec)).await?;
            crate::seed::seed(&pool, crate::seed::SeedRows::from_synthetic(&dataset), args.force).await?
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

async fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let store = ModelStore::open(&args.output)?;
    let stop = StopFlag::default();
    spawn_signal_handler(stop.clone());
    let data = match &args.database_url {
        Some(_) => DataSpec::Postgres(PostgresSpec {
            database: args.data_source_label.clone(),
            playlists: args.playlists,
            interactions_until_ms: None,
            tracks_until_ms: None,
        }),
        None => DataSpec::Synthetic(args.synthetic.spec(args.seed)),
    };
    let job = TrainJob {
        model: args.model.clone(),
        config: args.train_config_for(matches!(data, DataSpec::Postgres(_))),
        data,
        database_url: args.database_url.clone(),
        pool: None,
        minimums: MinimumSizes { tracks: args.min_tracks, users: args.min_users, interactions: args.min_interactions },
        trigger: "cli",
        keep_versions: args.keep_versions,
        keep_checkpoints: args.keep_checkpoints,
        started_at: None,
        device: args.device,
        resume: args.resume.clone(),
        run_id: None,
        lease_token: None,
        quality_tolerance: None,
        min_lift: args.min_lift,
        quality_floors: args.quality_floors,
        show_progress: !args.no_progress,
        stop,
        memory_budget: crate::resources::MemoryBudget::detect(None),
    };
    match job::run(&store, job).await? {
        RunOutcome::Published(p) => {
            let m = &p.metadata;
            println!("model {} version {} (run {})", m.model_name, p.version, p.run_id);
            print_scores(m);
            for (name, url) in &p.artifacts {
                println!("  {name}: {url}");
            }
            Ok(ExitCode::SUCCESS)
        }
        RunOutcome::InsufficientData { run_id, reason } => {
            println!("insufficient data (run {run_id}): {reason}; nothing was trained");
            Ok(ExitCode::from(3))
        }
        RunOutcome::Rejected(r) => {
            print_scores(&r.metadata);
            println!("not published (run {}): {}", r.run_id, r.reason);
            Ok(ExitCode::from(4))
        }
        RunOutcome::ResourceLimit(r) => {
            println!("not trained (run {}): {}", r.run_id, r.reason());
            Ok(ExitCode::from(5))
        }
        RunOutcome::Stopped { run_id, epochs_completed } => {
            println!(
                "stopped after {epochs_completed} complete epochs (checkpointed mid-epoch); continue with: audotics-trainer train --resume {run_id}"
            );
            Ok(ExitCode::from(130))
        }
    }
}

/// The version's held-out figures beside the baselines', on the same held-out listens.
fn print_scores(m: &crate::artifacts::ModelMetadata) {
    let f = &m.final_metrics;
    println!(
        "Recall@10 {:.4} ± {:.4}  NDCG@10 {:.4}  (epoch {} of {} trained, {}; {} hold-out, {} pairs)",
        f.recall_at_10,
        f.recall_at_10_se,
        f.ndcg_at_10,
        m.best_epoch,
        m.epochs_completed,
        m.stop_reason.as_str(),
        m.data.holdout.kind.as_str(),
        f.heldout
    );
    let b = &m.baselines;
    println!(
        "baselines, Recall@10 / NDCG@10: item-CF {:.4} / {:.4} | popularity {:.4} / {:.4} | raw features {:.4} / {:.4} | random {:.4} / {:.4}",
        b.item_cf.recall_at_10,
        b.item_cf.ndcg_at_10,
        b.popularity.recall_at_10,
        b.popularity.ndcg_at_10,
        b.raw_features.recall_at_10,
        b.raw_features.ndcg_at_10,
        b.random.recall_at_10,
        b.random.ndcg_at_10,
    );
}

/// First Ctrl-C/SIGTERM: stop at the next batch boundary (a checkpoint is written). Second: exit now.
fn spawn_signal_handler(stop: StopFlag) {
    crate::signals::on_stop_signals(move || {
        tracing::warn!("stop requested: stopping at the next batch boundary and writing a checkpoint");
        stop.request();
    });
}

pub(crate) fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(format!("not a whole number ({e})")),
    }
}

fn parse_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number ({e})"))?;
    if v.is_finite() { Ok(v) } else { Err("must be finite".into()) }
}

fn positive_finite(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v > 0.0 { Ok(v) } else { Err("must be greater than 0".into()) }
}

pub(crate) fn non_negative_finite(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v >= 0.0 { Ok(v) } else { Err("must be 0 or more".into()) }
}

fn open_unit_interval(s: &str) -> Result<f64, String> {
    let v = parse_f64(s)?;
    if v > 0.0 && v < 1.0 { Ok(v) } else { Err("must be strictly between 0 and 1".into()) }
}

fn dropout_rate(s: &str) -> Result<f32, String> {
    let v = parse_f64(s)?;
    if (0.0..1.0).contains(&v) { Ok(v as f32) } else { Err("must be at least 0 and below 1".into()) }
}

fn non_empty(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() { Err("must not be empty".into()) } else { Ok(s.to_string()) }
}

/// Model keys become object-store folders and routing-key segments. One rule for flags and requests
/// alike ([`crate::worker::request::is_model_key`]): a worker must never serve a key every request
/// for it would be dead-lettered for.
pub(crate) fn model_key(s: &str) -> Result<String, String> {
    if crate::worker::request::is_model_key(s) {
        Ok(s.to_string())
    } else {
        Err(crate::worker::request::MODEL_KEY_RULE.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_train(args: &[&str]) -> Result<TrainArgs, String> {
        let mut argv = vec!["audotics-trainer", "train"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv) {
            Ok(Cli { command: Command::Train(t), .. }) => Ok(*t),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.to_string().lines().next().unwrap().to_string()),
        }
    }

    #[test]
    fn auto_threads_are_one_for_small_batches_in_every_training_command() {
        let threads = |argv: &[&str]| Cli::try_parse_from(argv).unwrap().cpu_threads();
        assert_eq!(threads(&["t", "train"]), Some(1));
        assert_eq!(threads(&["t", "train", "--batch-size", "1024"]), None);
        assert_eq!(threads(&["t", "worker"]), Some(1), "the worker trains batches of 64 by default");
        assert_eq!(threads(&["t", "worker", "--batch-size", "8192"]), None);
        assert_eq!(threads(&["t", "bench", "--batch-sizes", "64"]), Some(1));
        assert_eq!(threads(&["t", "bench", "--batch-sizes", "64,1024"]), None, "each child decides");
        assert_eq!(threads(&["t", "--cpu-threads", "3", "worker"]), Some(3));
    }

    #[test]
    fn worker_models_follow_the_request_model_key_rule() {
        let models = |value: &str| match Cli::try_parse_from(["t", "worker", &format!("--models={value}")]) {
            Ok(Cli { command: Command::Worker(w), .. }) => Ok(w.models),
            Ok(_) => unreachable!(),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(models("content-based,cf-2").unwrap(), ["content-based", "cf-2"]);
        for bad in ["content_based", "-lead", "Upper", &"x".repeat(64)] {
            let error = models(bad).unwrap_err();
            assert!(error.contains("1-63 characters"), "{bad}: {error}");
            assert!(
                crate::worker::request::parse(format!(r#"{{"model":"{bad}"}}"#).as_bytes(), None, &[bad.to_string()])
                    .is_err(),
                "a request for {bad} is dead-lettered, so the flag must refuse it too"
            );
        }
        assert!(models(&"x".repeat(63)).is_ok());
    }

    #[test]
    fn defaults_are_the_old_trainers() {
        let t = parse_train(&[]).unwrap();
        assert_eq!((t.epochs, t.batch_size, t.embedding_size), (50, 64, 64));
        assert_eq!((t.validation_split, t.learning_rate), (0.2, 0.001));
        assert_eq!(t.device, DeviceChoice::Auto);
        assert_eq!(t.loss, LossKind::Contrastive);
        assert!(t.logq_correction);
        assert_eq!(t.output, "./models");
        assert_eq!(t.positive_types, DEFAULT_POSITIVE_KINDS.map(String::from).to_vec());
    }

    #[test]
    fn invalid_values_name_the_flag() {
        let cases: [(&[&str], &str); 12] = [
            (&["--epochs", "0"], "--epochs"),
            (&["--batch-size", "0"], "--batch-size"),
            (&["--validation-split", "0"], "--validation-split"),
            (&["--validation-split", "1"], "--validation-split"),
            (&["--validation-split", "1.5"], "--validation-split"),
            (&["--learning-rate", "0"], "--learning-rate"),
            (&["--learning-rate", "-0.1"], "--learning-rate"),
            (&["--learning-rate", "NaN"], "--learning-rate"),
            (&["--learning-rate", "inf"], "--learning-rate"),
            (&["--embedding-size", "0"], "--embedding-size"),
            (&["--device", "tpu"], "--device"),
            (&["--temperature", "0"], "--temperature"),
        ];
        for (args, flag) in cases {
            let err = parse_train(args).expect_err(&format!("{args:?} must be refused"));
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        assert!(parse_train(&["--model", "Bad Key"]).unwrap_err().contains("--model"));
        assert!(parse_train(&["--dropout", "1"]).unwrap_err().contains("--dropout"));
    }

    #[test]
    fn settings_map_into_the_training_config() {
        let t = parse_train(&[
            "--loss",
            "cosine",
            "--epochs",
            "3",
            "--positive-types",
            "play,like",
            "--logq-correction",
            "false",
        ])
        .unwrap();
        let c = t.train_config();
        assert_eq!(c.loss.kind, LossKind::Cosine);
        assert!(!c.loss.logq_correction);
        assert_eq!(c.epochs, 3);
        assert_eq!(c.positive_kinds, vec!["play", "like"]);
    }
}
