use std::time::Duration;

use audotics_trainer::contract::request::RetrainRequest;
use audotics_trainer::db::coord::{self, EventDraft, Finish};
use audotics_trainer::db::ledger;

use crate::helpers::TestDb;

/// What the fault suite's long run found (102 "overlapping runs"): an attempt taken over mid-run
/// leaves its ledger row `running`; when the run's last attempt then fails before it reaches the
/// ledger (S3 refused a worker whose clock was a day ahead), the row must still end with the run.
#[tokio::test]
async fn a_run_failed_for_good_by_an_attempt_that_never_reached_the_ledger_still_ends_there() {
    let db = TestDb::new().await;
    audotics_trainer::db::migrate(&db.pool).await.unwrap();
    let request = RetrainRequest {
        event_id: "r1".into(),
        model: "m".into(),
        requested_at: None,
        interactions_until: None,
        reason: None,
        params: None,
    };
    coord::record_request(&db.pool, &request).await.unwrap();
    let lease = Duration::from_secs(60);
    let first = coord::claim(&db.pool, "w1", &["m".to_string()], lease).await.unwrap().unwrap();
    ledger::record_start(&db.pool, first.run_id, "m", "v1", "worker", &serde_json::json!({})).await.unwrap();
    // w1 vanishes mid-run (kill -9): its lease runs out and w2 takes the run over.
    db.exec("UPDATE audotics_trainer.run_jobs SET lease_expires_at = now() - interval '1 second'").await;
    let second = coord::claim(&db.pool, "w2", &["m".to_string()], lease).await.unwrap().unwrap();
    assert!(second.taken_over && second.run_id == first.run_id);
    let event_id = uuid::Uuid::new_v4();
    let event = EventDraft {
        event_id,
        routing_key: "model-failed.m".into(),
        body: serde_json::json!({"event_id": event_id.to_string(), "outcome": "failed", "satisfies": []}),
    };
    let error = Some("the store refused the request".to_string());
    let finish = Finish { state: "failed", answer: "model-failed", version: None, error, event, published: None };
    assert!(coord::finish(&db.pool, &second, finish).await.unwrap());
    let ended = "SELECT count(*) FROM audotics_trainer.training_runs
                 WHERE status = 'failed' AND finished_at IS NOT NULL AND error = 'the store refused the request'";
    assert_eq!(db.count(ended).await, 1, "the ledger's row ends with the run");
}
