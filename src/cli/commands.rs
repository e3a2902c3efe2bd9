//! The commands' bodies: each turns its flags into calls of the stages below and prints the result.

use std::process::ExitCode;

use super::args::{MigrateArgs, ReplayArgs, RetrainArgs, RollbackArgs, SeedArgs, SpotifyBaselinesArgs};
use super::train_args::TrainArgs;
use crate::broker;
use crate::contract::request::RetrainRequest;
use crate::job::{self, DataSpec, RunOutcome, StopFlag, TrainJob};
use crate::publish::artifacts::ModelMetadata;
use crate::publish::store::ModelStore;
use crate::training::eval::RankingMetrics;
use crate::training::resources::MemoryBudget;

/// Publishes one `retrain` request with confirms; fails when no queue would receive it.
pub(super) async fn retrain(args: RetrainArgs) -> anyhow::Result<ExitCode> {
    let interactions_until = match &args.interactions_until {
        Some(until) => Some(
            chrono::DateTime::parse_from_rfc3339(until)
                .map_err(|e| anyhow::anyhow!("--interactions-until {until:?} is not RFC 3339: {e}"))?
                .with_timezone(&chrono::Utc),
        ),
        None => None,
    };
    let params = match &args.params {
        Some(params) => Some(serde_json::from_str(params).map_err(|e| anyhow::anyhow!("--params is not valid: {e}"))?),
        None => None,
    };
    let request = RetrainRequest {
        event_id: args.event_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        model: args.model.clone(),
        requested_at: Some(chrono::Utc::now()),
        interactions_until,
        reason: args.reason.clone(),
        params,
    };
    let bytes = request.to_body();
    // Refuse here what the worker would dead-letter (params out of bounds, an over-long reason).
    crate::contract::request::parse(&bytes, None, std::slice::from_ref(&args.model))
        .map_err(|r| anyhow::anyhow!("invalid request ({}): {}", r.reason.as_str(), r.detail))?;
    let settings = client_settings(&args.amqp_url, args.delivery_limit, args.dead_letter_max_messages, "retrain");
    let connection = broker::connect(&settings).await?;
    // No model queue: a model no worker serves is dead-lettered (`unknown_model`), not kept waiting.
    broker::declare_topology(&connection, &settings, &[]).await?;
    let channel = broker::confirm_channel(&connection).await?;
    let event_id = request.event_id;
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

pub(super) async fn spotify_baselines(args: SpotifyBaselinesArgs) -> anyhow::Result<ExitCode> {
    let url = args.train.database_url.clone().ok_or_else(|| anyhow::anyhow!("--database-url is required"))?;
    let pool = crate::db::connect(&url).await?;
    let config = args.train.train_config_for(true);
    let options = crate::data::source::LoadOptions {
        playlists: args.train.playlists,
        positive_kinds: config.positive_kinds.clone(),
        interactions_until_ms: None,
        tracks_until_ms: None,
    };
    let dataset = crate::db::load::load(&pool, &options, &args.train.data_source_label).await?;
    let csv = args.spotify_csv.clone();
    let rows = tokio::task::spawn_blocking(move || crate::bench::spotify::baselines(&dataset, &config, &csv)).await??;
    print_metrics_table("baseline", rows);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn synthetic_ceiling(args: TrainArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.database_url.is_none(),
        "synthetic-ceiling measures the synthetic history: drop --database-url"
    );
    let config = args.train_config_for(false);
    let spec = args.synthetic.spec(args.seed);
    let rows = tokio::task::spawn_blocking(move || crate::bench::ceiling::ceiling(&spec, &config)).await??;
    print_metrics_table("ranker", rows);
    Ok(ExitCode::SUCCESS)
}

fn print_metrics_table(first_column: &str, rows: Vec<(&str, RankingMetrics)>) {
    println!("| {first_column} | Recall@10 | ± | NDCG@10 | held-out (user, track) | users |");
    println!("|---|---|---|---|---|---|");
    for (name, m) in rows {
        let (r, se, ndcg) = (m.recall_at_10, m.recall_at_10_se, m.ndcg_at_10);
        println!("| {name} | {r:.4} | {se:.4} | {ndcg:.4} | {} | {} |", m.heldout, m.users);
    }
}

pub(super) async fn seed(args: SeedArgs) -> anyhow::Result<ExitCode> {
    let pool = crate::db::connect(&args.database_url).await?;
    let report = match &args.spotify_csv {
        Some(path) => {
            let path = path.clone();
            let rows =
                tokio::task::spawn_blocking(move || crate::db::seed::SeedRows::from_spotify_csv(&path)).await??;
            crate::db::seed::seed(&pool, rows, args.force).await?
        }
        None => {
            let spec = args.synthetic.spec(args.seed);
            let dataset = tokio::task::spawn_blocking(move || crate::data::synthetic::generate(&spec)).await?;
            crate::db::seed::seed(&pool, crate::db::seed::SeedRows::from_synthetic(&dataset), args.force).await?
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn train(command: super::train_args::TrainCommand) -> anyhow::Result<ExitCode> {
    let args = &command.args;
    let store = ModelStore::open(&args.output)?;
    let stop = StopFlag::default();
    spawn_signal_handler(stop.clone());
    let defaults = args.run_defaults(args.database_url.is_some());
    let data = match &args.database_url {
        Some(_) => defaults.postgres_data(),
        None => DataSpec::Synthetic(args.synthetic.spec(args.seed)),
    };
    let job = TrainJob {
        database_url: args.database_url.clone(),
        resume: args.resume.clone(),
        refresh: command.refresh,
        requested_full: command.full,
        show_progress: !args.no_progress,
        memory_budget: MemoryBudget::detect(None),
        ..defaults.job(args.model.clone(), defaults.config.clone(), data, stop)
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

pub(super) async fn migrate(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let pool = crate::db::connect(&args.database_url).await?;
    crate::db::migrate(&pool).await?;
    println!("schema {} is up to date", crate::db::SCHEMA);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn rollback(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let store = ModelStore::open(&args.output)?;
    let (from, to) = super::operator::rollback(&store, &args.model, args.to.as_deref()).await?;
    println!("{}: latest.json {} → {to}", args.model, from.as_deref().unwrap_or("(none)"));
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn replay_dead_letters(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let settings =
        client_settings(&args.amqp_url, args.delivery_limit, args.dead_letter_max_messages, "replay-dead-letters");
    let letters = super::operator::replay_dead_letters(&settings, args.limit, args.replay).await?;
    for letter in &letters {
        println!("{}", serde_json::to_string(letter)?);
    }
    let action = if args.replay { "replayed" } else { "left in place (dry run; --replay sends them back)" };
    eprintln!("{} dead letters {action}", letters.len());
    Ok(ExitCode::SUCCESS)
}

/// The version's held-out figures beside the baselines', on the same held-out listens.
fn print_scores(m: &ModelMetadata) {
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
    let pair = |r: &RankingMetrics| format!("{:.4} / {:.4}", r.recall_at_10, r.ndcg_at_10);
    println!(
        "baselines, Recall@10 / NDCG@10: item-CF {} | shared artist {} | shared album {} | popularity {} | raw features {} | random {}",
        pair(&b.item_cf),
        pair(&b.shared_artist),
        pair(&b.shared_album),
        pair(&b.popularity),
        pair(&b.raw_features),
        pair(&b.random),
    );
    if let (Some(cold), Some(summary)) = (&b.cold, &m.data.cold_holdout) {
        let model = m.final_cold_metrics.as_ref().map_or("n/a (no row for an unplayed track)".to_string(), |r| {
            format!("{:.4} ± {:.4} / {:.4}", r.recall_at_10, r.recall_at_10_se, r.ndcg_at_10)
        });
        println!(
            "cold tracks ({} held out, {} pairs), Recall@10 / NDCG@10: model {model} | shared artist {} | shared album {} | raw features {} | random {}",
            summary.tracks,
            summary.heldout_pairs,
            pair(&cold.shared_artist),
            pair(&cold.shared_album),
            pair(&cold.raw_features),
            pair(&cold.random),
        );
    }
}

/// First Ctrl-C/SIGTERM: stop at the next batch boundary (a checkpoint is written). Second: exit now.
fn spawn_signal_handler(stop: StopFlag) {
    crate::system::signals::on_stop_signals(move || {
        tracing::warn!("stop requested: stopping at the next batch boundary and writing a checkpoint");
        stop.request();
    });
}

/// Broker settings of a one-shot client command (`retrain`, `replay-dead-letters`): one message at
/// a time, and the queue arguments the workers declare, so that declaring the topology agrees with them.
fn client_settings(
    url: &str,
    delivery_limit: usize,
    dead_letter_max_messages: usize,
    command: &str,
) -> broker::BrokerSettings {
    broker::BrokerSettings {
        url: url.to_string(),
        delivery_limit: delivery_limit as i64,
        dead_letter_max_messages: dead_letter_max_messages as i64,
        prefetch: 1,
        connection_name: format!("audotics-trainer {command}"),
    }
}
