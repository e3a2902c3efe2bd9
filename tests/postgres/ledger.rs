use std::time::Duration;

use audotics_trainer::db::coord::{self, EventDraft, Finish};
use audotics_trainer::db::ledger;

use serde_json::json;

use crate::helpers::{TestDb, retrain_request};

/// What the fault suite's long run found (102 "overlapping runs"): an attempt taken over mid-run
/// leaves its ledger row `running`; when the run's last attempt then fails before it reaches the
/// ledger (S3 refused a worker whose clock was a day ahead), the row must still end with the run.
#[tokio::test]
async fn a_run_failed_for_good_by_an_attempt_that_never_reached_the_ledger_still_ends_there() {
    let db = TestDb::new().await;
    audotics_trainer::db::migrate(&db.pool).await.unwrap();
    coord::record_request(&db.pool, &retrain_request("r1")).await.unwrap();
    let lease = Duration::from_secs(60);
    let empty = json!({});
    let first = coord::claim(&db.pool, "w1", &["m".to_string()], lease).await.unwrap().unwrap();
    let started = ledger::record_start(&db.pool, first.run_id, "m", "v1", "worker", &empty, Some(first.token));
    assert!(started.await.unwrap(), "the lease holds: the row is written");
    // w1 vanishes mid-run (kill -9): its lease runs out and w2 takes the run over.
    db.exec("UPDATE audotics_trainer.run_jobs SET lease_expires_at = now() - interval '1 second'").await;
    let second = coord::claim(&db.pool, "w2", &["m".to_string()], lease).await.unwrap().unwrap();
    assert!(second.taken_over && second.run_id == first.run_id);
    let event_id = uuid::Uuid::new_v4();
    let event = EventDraft {
        event_id,
        routing_key: "model-failed.m".into(),
        body: json!({"event_id": event_id.to_string(), "outcome": "failed", "satisfies": []}),
    };
    let error = Some("the store refused the request".to_string());
    let finish = Finish { state: "failed", answer: "model-failed", version: None, error, event, published: None };
    assert!(coord::finish(&db.pool, &second, finish).await.unwrap());
    let ended = "SELECT count(*) FROM audotics_trainer.training_runs
                 WHERE status = 'failed' AND finished_at IS NOT NULL AND error = 'the store refused the request'";
    assert_eq!(db.count(ended).await, 1, "the ledger's row ends with the run");
}

/// What the fault suite found on CI (38 "overlapping runs"): a worker paused between its claim and
/// the ledger's first write came back after another worker had taken the run over and finished it,
/// and marked the row `running` again, for ever. With its lease gone the write must not happen.
#[tokio::test]
async fn a_worker_whose_lease_is_gone_does_not_mark_a_finished_run_running_again() {
    let db = TestDb::new().await;
    audotics_trainer::db::migrate(&db.pool).await.unwrap();
    coord::record_request(&db.pool, &retrain_request("r1")).await.unwrap();
    let lease = Duration::from_secs(60);
    let empty = json!({});
    let paused = coord::claim(&db.pool, "w1", &["m".to_string()], lease).await.unwrap().unwrap();
    // w1 stops (SIGSTOP) before its first ledger write; its lease runs out and w2 takes the run over.
    db.exec("UPDATE audotics_trainer.run_jobs SET lease_expires_at = now() - interval '1 second'").await;
    let owner = coord::claim(&db.pool, "w2", &["m".to_string()], lease).await.unwrap().unwrap();
    assert!(owner.taken_over && owner.run_id == paused.run_id);
    let stale = ledger::record_start(&db.pool, paused.run_id, "m", "v1", "worker", &empty, Some(paused.token));
    assert!(!stale.await.unwrap(), "a lease taken over: nothing is written");
    assert_eq!(db.count("SELECT count(*) FROM audotics_trainer.training_runs").await, 0);
    let started = ledger::record_start(&db.pool, owner.run_id, "m", "v1", "worker", &empty, Some(owner.token));
    assert!(started.await.unwrap());
    let end = ledger::RunEnd::default();
    let ended = ledger::record_end(&db.pool, owner.run_id, ledger::RunStatus::Failed, &end, Some(owner.token));
    assert!(ended.await.unwrap());
    let event_id = uuid::Uuid::new_v4();
    let event = EventDraft {
        event_id,
        routing_key: "model-failed.m".into(),
        body: json!({"event_id": event_id.to_string(), "outcome": "failed", "satisfies": []}),
    };
    let finish = Finish { state: "failed", answer: "model-failed", version: None, error: None, event, published: None };
    assert!(coord::finish(&db.pool, &owner, finish).await.unwrap());
    // w1 resumes and tries again, now that the run is finished: still nothing is written.
    let stale = ledger::record_start(&db.pool, paused.run_id, "m", "v1", "worker", &empty, Some(paused.token));
    assert!(!stale.await.unwrap());
    let running = "SELECT count(*) FROM audotics_trainer.training_runs WHERE status = 'running' OR finished_at IS NULL";
    assert_eq!(db.count(running).await, 0, "the finished run stays finished");
    // A CLI run (no lease) always records its start.
    let cli = uuid::Uuid::new_v4();
    assert!(ledger::record_start(&db.pool, cli, "m", "v2", "cli", &empty, None).await.unwrap());
}
