//! What a fault run records: requests sent, events and dead letters received, `latest.json` samples
//! taken while it ran, and the final state of the ledger, the store and the workers.

use serde::{Deserialize, Serialize};

/// A retrain request the workload published and RabbitMQ confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentRequest {
    pub event_id: String,
    pub model: String,
    pub sent_ms: i64,
}

/// `model-ready`, `model-rejected` or `model-failed`, as a consumer received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(clippy::enum_variant_names)] // the events' own names, `model-*`, spelled by serde
pub enum EventKind {
    ModelReady,
    ModelRejected,
    ModelFailed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObservedEvent {
    pub kind: EventKind,
    pub event_id: String,
    pub model: String,
    /// The version announced (ready, rejected), or the run id (failed).
    pub subject: String,
    pub satisfies: Vec<String>,
    pub received_ms: i64,
}

/// A message the workload sent on purpose malformed (or oversized), by AMQP `message_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MalformedSent {
    pub message_id: String,
    pub expected_reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterSeen {
    pub message_id: String,
    pub reason: String,
}

/// One reading of `<model>/latest.json` during the run: did the manifest it names exist?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestSample {
    pub model: String,
    pub version: String,
    pub manifest_present: bool,
    pub at_ms: i64,
}

/// A run from the `training_runs` ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRun {
    pub run_id: String,
    pub model: String,
    pub started_ms: i64,
    /// `None`: still running at the end.
    pub finished_ms: Option<i64>,
    pub status: String,
    /// How many times the run was started (resumes included).
    pub attempts: i64,
}

/// A published version, checked against its manifest at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionCheck {
    pub model: String,
    pub version: String,
    /// `None` when every artifact exists and matches its manifest's size and sha256.
    pub problem: Option<String>,
}

/// Everything the checker reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub sent: Vec<SentRequest>,
    /// Event ids the worker recorded (and therefore acked): `retrain_requests` at the end.
    pub acked: Vec<String>,
    pub events: Vec<ObservedEvent>,
    pub malformed: Vec<MalformedSent>,
    pub dead_letters: Vec<DeadLetterSeen>,
    pub latest_samples: Vec<LatestSample>,
    pub runs: Vec<LedgerRun>,
    pub versions: Vec<VersionCheck>,
    /// Workers and whether each answered `/readyz` 200 at the end.
    pub workers_ready: Vec<(String, bool)>,
    /// Runs still holding a lease at the end although no worker is running them.
    pub orphaned_leases: Vec<String>,
    /// Workers that, sent SIGTERM, did not exit 0 within their grace period.
    pub unclean_shutdowns: Vec<String>,
    /// Valid requests RabbitMQ itself dead-lettered (delivery limit reached while workers kept
    /// dying with them unacked) and that the harness replayed, as the runbook tells an operator to.
    pub replayed: Vec<String>,
    /// Faults injected, by kind.
    pub faults: Vec<(String, i64)>,
}
