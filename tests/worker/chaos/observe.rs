//! What the checker reads: `latest.json` sampled while the suite runs, the drain that waits for
//! every request's answer, and the final state of the ledger, the store and the leases.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::history::*;
use audotics_trainer::broker;
use audotics_trainer::publish::{layout, store::ModelStore, versions};
use sqlx::Row;
use tokio::sync::watch;

use super::cluster::Cluster;
use crate::harness::{Recorded, TestDb, satisfied};

/// Reads every model's `latest.json` every 200 ms until `stop`, and whether the manifest it names
/// exists. A missing manifest only counts if `latest.json` still names that version when read
/// again (retention may have removed a version `latest.json` had moved past in between). Reads
/// that fail (the S3 server is down) are not samples.
pub async fn sample_latest(store: ModelStore, models: Vec<String>, stop: watch::Receiver<bool>) -> Vec<LatestSample> {
    let mut samples = Vec::new();
    while !*stop.borrow() {
        for model in &models {
            let Ok(Some(latest)) = versions::read_latest(&store, model).await else { continue };
            let manifest_present = match store.exists(&latest.manifest).await {
                Ok(true) => true,
                Ok(false) => match versions::read_latest(&store, model).await {
                    Ok(Some(again)) if again.version == latest.version => false,
                    _ => continue,
                },
                Err(_) => continue,
            };
            let at_ms = chrono::Utc::now().timestamp_millis();
            samples.push(LatestSample { model: model.clone(), version: latest.version, manifest_present, at_ms });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    samples
}

/// Waits (up to `limit`) until every request sent is recorded and answered and every malformed
/// message dead-lettered. Valid requests RabbitMQ dead-lettered on its delivery limit are replayed
/// once, as the runbook tells an operator to; their ids are returned.
pub async fn drain(
    cluster: &Cluster,
    sent: &[SentRequest],
    malformed: &[MalformedSent],
    limit: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let sent_ids: BTreeSet<&str> = sent.iter().map(|r| r.event_id.as_str()).collect();
    let mut replayed = Vec::new();
    let mut replayer: Option<crate::harness::Publisher> = None;
    loop {
        let all = cluster.events.all();
        for letter in all.iter().filter(|r| r.dead && !r.headers.contains_key(broker::REASON_HEADER)) {
            let Some(id) = letter.message_id.as_deref().filter(|id| sent_ids.contains(id)) else { continue };
            if replayed.iter().any(|r| r == id) {
                continue;
            }
            let publisher = match &replayer {
                Some(p) => p,
                None => replayer.insert(crate::harness::Publisher::new(&cluster.vhost).await),
            };
            publisher.raw(&letter.routing_key, &letter.raw, id).await;
            replayed.push(id.to_string());
        }
        let acked = acked(&cluster.db).await;
        let answered = satisfied(&all);
        let dead: BTreeSet<&str> = all.iter().filter(|r| r.dead).filter_map(|r| r.message_id.as_deref()).collect();
        let waiting = sent.iter().filter(|r| !answered.contains(&r.event_id)).count()
            + acked.iter().filter(|id| !answered.contains(*id)).count()
            + malformed.iter().filter(|m| !dead.contains(m.message_id.as_str())).count();
        if waiting == 0 {
            return replayed;
        }
        if Instant::now() >= deadline {
            println!("chaos: drain gave up after {limit:?} with {waiting} answers missing");
            return replayed;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every request the workers recorded (they ack only after recording).
pub async fn acked(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT event_id FROM audotics_trainer.retrain_requests")
        .fetch_all(&db.pool)
        .await
        .expect("read retrain_requests")
}

/// The announced events, as the checker models them.
pub fn answers(all: &[Recorded]) -> Vec<ObservedEvent> {
    all.iter()
        .filter(|r| !r.dead)
        .filter_map(|r| {
            let kind = match r.routing_key.split('.').next()? {
                "model-ready" => EventKind::ModelReady,
                "model-rejected" => EventKind::ModelRejected,
                "model-failed" => EventKind::ModelFailed,
                _ => return None,
            };
            let b = &r.body;
            let subject = match kind {
                EventKind::ModelFailed => b["run_id"].as_str(),
                _ => b["version"].as_str(),
            };
            Some(ObservedEvent {
                kind,
                event_id: b["event_id"].as_str().unwrap_or_default().to_string(),
                model: b["model"].as_str().unwrap_or_default().to_string(),
                subject: subject.unwrap_or_default().to_string(),
                satisfies: b["satisfies"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default(),
                received_ms: r.received_ms,
            })
        })
        .collect()
}

pub fn dead_letters(all: &[Recorded]) -> Vec<DeadLetterSeen> {
    all.iter()
        .filter(|r| r.dead)
        .map(|r| DeadLetterSeen {
            message_id: r.message_id.clone().unwrap_or_default(),
            reason: r.headers.get(broker::REASON_HEADER).cloned().unwrap_or_else(|| "delivery_limit".to_string()),
        })
        .collect()
}

/// Every run in the `training_runs` ledger.
pub async fn ledger(db: &TestDb) -> Vec<LedgerRun> {
    let rows = sqlx::query(
        "SELECT id::text AS id, model, status, attempts::bigint AS attempts,
                (extract(epoch FROM started_at) * 1000)::bigint AS started_ms,
                (extract(epoch FROM finished_at) * 1000)::bigint AS finished_ms
         FROM audotics_trainer.training_runs",
    )
    .fetch_all(&db.pool)
    .await
    .expect("read training_runs");
    rows.iter()
        .map(|r| LedgerRun {
            run_id: r.get("id"),
            model: r.get("model"),
            started_ms: r.get("started_ms"),
            finished_ms: r.get("finished_ms"),
            status: r.get("status"),
            attempts: r.get("attempts"),
        })
        .collect()
}

/// Every version a `model-ready` announced, checked against the manifest the event names.
pub async fn verify_versions(store: &ModelStore, all: &[Recorded]) -> Vec<VersionCheck> {
    let mut seen = BTreeSet::new();
    let mut checks = Vec::new();
    for r in all.iter().filter(|r| !r.dead && r.routing_key.starts_with("model-ready.")) {
        let (model, version) =
            (r.body["model"].as_str().unwrap_or_default(), r.body["version"].as_str().unwrap_or_default());
        if !seen.insert((model.to_string(), version.to_string())) {
            continue;
        }
        let key = layout::version_object(model, version, layout::MANIFEST);
        let problem = match versions::read_manifest(store, &key, r.body["manifest_sha256"].as_str()).await {
            Ok(manifest) => versions::verify(store, &manifest).await.err().map(|e| format!("{e:#}")),
            Err(e) => Some(format!("{e:#}")),
        };
        checks.push(VersionCheck { model: model.to_string(), version: version.to_string(), problem });
    }
    checks
}

/// Runs still leased or waiting for a retry once every request is answered: nobody will finish them.
pub async fn orphaned_leases(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT run_id::text || ' (' || state || ', owner ' || coalesce(lease_owner, '-') || ')'
         FROM audotics_trainer.run_jobs WHERE state IN ('running', 'retry')",
    )
    .fetch_all(&db.pool)
    .await
    .expect("read run_jobs")
}
