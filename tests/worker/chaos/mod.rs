//! The fault suite (issue 7), after RabbitMQ's Jepsen tests: a workload (N worker processes, a
//! publisher of retrain requests for several models, consumers recording every answer), a nemesis
//! injecting faults on a seeded random schedule, and the checker ([`checker`], over the [`history`] the others record) over
//! what was recorded and the final state.
//!
//! The README's test command runs the short profile; longer runs are the same test with
//! `CHAOS_*` settings (see [`Profile::from_env`] and RELIABILITY.md).

mod checker;
mod cluster;
mod history;
mod nemesis;
mod observe;
mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use history::History;
use tokio::sync::watch;

use cluster::Cluster;

/// What a fault run does; every field has a `CHAOS_*` environment variable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Profile {
    /// Seconds of load and faults (the drain afterwards is extra).
    pub seconds: u64,
    pub seed: u64,
    pub workers: usize,
    pub models: Vec<String>,
    /// Steady requests per second, spread over the models.
    pub rate: f64,
    /// A burst of this many requests for one model every `burst_every` seconds.
    pub burst: usize,
    pub burst_every: u64,
    /// Mean pause between two faults, in seconds.
    pub fault_gap: f64,
    /// Longest database or S3 outage, in seconds.
    pub max_outage: u64,
    /// How long the drain may take before what is still unanswered counts as lost.
    pub drain_seconds: u64,
    pub lease_seconds: u64,
    /// Only these faults (their names in the report, e.g. `worker clock a day ahead`); empty: all.
    pub only: Vec<String>,
    #[serde(skip)]
    pub report: Option<PathBuf>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

impl Profile {
    /// The short profile unless `CHAOS_*` variables say otherwise. The seed defaults to the clock
    /// (every CI run explores a new schedule) and is printed, so any run can be replayed.
    pub fn from_env() -> Self {
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let models: String = env_or("CHAOS_MODELS", "content-based,content-eu,content-kids".to_string());
        Self {
            seconds: env_or("CHAOS_SECONDS", 100),
            seed: env_or("CHAOS_SEED", clock),
            workers: env_or("CHAOS_WORKERS", 3),
            models: models.split(',').map(str::to_string).collect(),
            rate: env_or("CHAOS_RATE", 2.0),
            burst: env_or("CHAOS_BURST", 40),
            burst_every: env_or("CHAOS_BURST_EVERY", 25),
            fault_gap: env_or("CHAOS_FAULT_GAP", 3.0),
            max_outage: env_or("CHAOS_MAX_OUTAGE", 12),
            drain_seconds: env_or("CHAOS_DRAIN_SECONDS", 150),
            lease_seconds: 6,
            only: std::env::var("CHAOS_ONLY")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default(),
            report: std::env::var_os("CHAOS_REPORT").map(PathBuf::from),
        }
    }
}

/// Runs the suite and panics, after printing the report, when an invariant is violated.
pub async fn run(profile: Profile) {
    println!("chaos profile: {}", serde_json::to_string(&profile).unwrap());
    let started = Instant::now();
    let mut cluster = Cluster::start(&profile).await;
    let (stop_load, load_stopped) = watch::channel(false);
    let (stop_sampling, sampling_stopped) = watch::channel(false);
    let publisher = tokio::spawn(workload::publish(cluster.vhost.settings(), profile.clone(), load_stopped));
    let sampler =
        tokio::spawn(observe::sample_latest(cluster.s3.store("chaos"), profile.models.clone(), sampling_stopped));
    let deadline = Instant::now() + Duration::from_secs(profile.seconds);
    let nemesis = nemesis::run(&mut cluster, &profile, deadline).await;
    let _ = stop_load.send(true);
    let sent = publisher.await.expect("publisher task");
    println!("chaos: {} s of load and {} faults; draining", profile.seconds, nemesis.injected());

    cluster.heal().await;
    let drain = Instant::now();
    let replayed =
        observe::drain(&cluster, &sent, &nemesis.malformed, Duration::from_secs(profile.drain_seconds)).await;
    println!("chaos: drained in {:.1} s", drain.elapsed().as_secs_f64());
    let _ = stop_sampling.send(true);
    let latest_samples = sampler.await.expect("sampler task");

    let events = cluster.events.all();
    let history = History {
        acked: observe::acked(&cluster.db).await,
        events: observe::answers(&events),
        dead_letters: observe::dead_letters(&events),
        latest_samples,
        runs: observe::ledger(&cluster.db).await,
        versions: observe::verify_versions(&cluster.s3.store("chaos"), &events).await,
        workers_ready: cluster.readiness().await,
        orphaned_leases: observe::orphaned_leases(&cluster.db).await,
        unclean_shutdowns: cluster.unclean_shutdowns.clone(),
        replayed,
        faults: nemesis.counts(),
        malformed: nemesis.malformed,
        sent,
    };
    let verdict = checker::check(&history);
    let report = format!(
        "chaos report (seed {}, {} workers, models {}, {:.0} s in all)\n{}",
        profile.seed,
        profile.workers,
        profile.models.join(","),
        started.elapsed().as_secs_f64(),
        verdict.report()
    );
    println!("{report}");
    if let Some(path) = &profile.report {
        let json = serde_json::json!({"profile": profile, "verdict": verdict, "report": report});
        std::fs::write(path, serde_json::to_vec_pretty(&json).unwrap()).expect("write CHAOS_REPORT");
    }
    if !verdict.ok() {
        let logs = cluster.keep_logs();
        panic!("the fault suite found violations (seed {}; worker logs kept in {logs:?}):\n{report}", profile.seed);
    }
}
