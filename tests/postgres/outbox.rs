use std::time::Duration;

use audotics_trainer::db::coord::{self, EventDraft, Finish, SATISFIES_PER_EVENT};

use crate::helpers::{TestDb, retrain_request};

#[tokio::test]
async fn a_burst_coalesced_into_one_run_is_announced_in_bounded_messages_that_answer_every_request() {
    let db = TestDb::new().await;
    audotics_trainer::db::migrate(&db.pool).await.unwrap();
    let n = 2 * SATISFIES_PER_EVENT + 17;
    for i in 0..n {
        coord::record_request(&db.pool, &retrain_request(format!("burst-{i}"))).await.unwrap();
    }
    let claim = coord::claim(&db.pool, "w", &["m".to_string()], Duration::from_secs(60)).await.unwrap().unwrap();
    let event_id = uuid::Uuid::new_v4();
    let event = EventDraft {
        event_id,
        routing_key: "model-failed.m".into(),
        body: serde_json::json!({"event_id": event_id.to_string(), "outcome": "failed", "satisfies": []}),
    };
    let finish = Finish { state: "failed", answer: "model-failed", version: None, error: None, event, published: None };
    assert!(coord::finish(&db.pool, &claim, finish).await.unwrap());
    let bodies: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT body FROM audotics_trainer.outbox WHERE event_id = $1 ORDER BY id")
            .bind(event_id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(bodies.len(), 3, "{} requests in messages of at most {SATISFIES_PER_EVENT}", n);
    let mut answered: Vec<String> = Vec::new();
    for body in &bodies {
        let satisfies = body["satisfies"].as_array().unwrap();
        assert!(!satisfies.is_empty() && satisfies.len() <= SATISFIES_PER_EVENT);
        assert!(serde_json::to_vec(body).unwrap().len() < 64 * 1024);
        answered.extend(satisfies.iter().map(|v| v.as_str().unwrap().to_string()));
    }
    answered.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("burst-{i}")).collect();
    expected.sort();
    assert_eq!(answered, expected, "every request exactly once");
}

#[tokio::test]
async fn an_event_that_keeps_failing_is_parked_and_the_events_behind_it_go_on() {
    let db = TestDb::new().await;
    audotics_trainer::db::migrate(&db.pool).await.unwrap();
    db.exec(
        "INSERT INTO audotics_trainer.outbox (event_id, routing_key, body) VALUES
           (gen_random_uuid(), 'model-ready.m', '{\"n\": 1}'), (gen_random_uuid(), 'model-ready.m', '{\"n\": 2}')",
    )
    .await;
    let next = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let events = coord::next_outbox(&mut tx, 1).await.unwrap();
            tx.commit().await.unwrap();
            events.into_iter().next().map(|e| (e.id, e.body["n"].as_i64().unwrap()))
        }
    };
    let (first, n) = next(&db).await.unwrap();
    assert_eq!(n, 1);
    for attempt in 1..3 {
        assert!(!coord::mark_publish_failed(&db.pool, first, "frame too large", 3).await.unwrap(), "{attempt}");
        assert_eq!(next(&db).await.unwrap().1, 1, "still first in line before it is parked");
    }
    assert!(coord::mark_publish_failed(&db.pool, first, "frame too large", 3).await.unwrap(), "parked at 3");
    assert_eq!(next(&db).await.unwrap().1, 2, "the event behind it is next");
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM audotics_trainer.outbox WHERE parked_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((attempts, error.as_str()), (3, "frame too large"));
}

/// The refresh timer's request: once per version (whichever worker ticks), never while the model
/// has an unanswered request, and a pending request of another model does not hold it back.
#[tokio::test]
async fn the_refresh_timer_asks_once_per_version_and_never_beside_an_unanswered_request() {
    let db = TestDb::new().await;
    audotics_trainer::db::migrate(&db.pool).await.unwrap();
    let refresh = |version: &'static str| coord::record_timer_refresh(&db.pool, "m", version, 60);
    let answer_all = || db.exec("UPDATE audotics_trainer.retrain_requests SET answered_at = now()");

    assert_eq!(refresh("v1").await.unwrap(), coord::TimerRefresh::Recorded);
    assert_eq!(refresh("v1").await.unwrap(), coord::TimerRefresh::RequestPending, "a second worker's tick");
    answer_all().await;
    assert_eq!(refresh("v1").await.unwrap(), coord::TimerRefresh::AlreadyAsked, "answered: asked once for v1");

    coord::record_request(&db.pool, &retrain_request("plain")).await.unwrap();
    assert_eq!(refresh("v2").await.unwrap(), coord::TimerRefresh::RequestPending, "a retrain is pending");
    answer_all().await;
    let other = audotics_trainer::contract::request::RetrainRequest { model: "other".into(), ..retrain_request("o") };
    coord::record_request(&db.pool, &other).await.unwrap();
    assert_eq!(refresh("v2").await.unwrap(), coord::TimerRefresh::Recorded, "another model's request is not m's");

    let timer: Vec<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT event_id, params FROM audotics_trainer.retrain_requests WHERE event_id LIKE 'refresh-timer:%' ORDER BY event_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let expected =
        ["refresh-timer:m:v1", "refresh-timer:m:v2"].map(|id| (id.to_string(), serde_json::json!({"refresh": true})));
    assert_eq!(timer, expected.to_vec());
}

/// Coalescing: the newest request's params decide, but a refresh never answers a request for
/// training — a pending retrain makes the coalesced run train, without the refresh flag.
#[tokio::test]
async fn a_retrain_coalesced_with_a_newer_refresh_trains() {
    use audotics_trainer::contract::request::{Params, RetrainRequest};
    let db = TestDb::new().await;
    audotics_trainer::db::migrate(&db.pool).await.unwrap();
    let with = |id: &str, params: Option<Params>| RetrainRequest { params, ..retrain_request(id) };
    let refresh = || Some(Params { refresh: Some(true), ..Default::default() });
    let claim_params = || async {
        let claim = coord::claim(&db.pool, "w", &["m".to_string()], Duration::from_secs(60)).await.unwrap().unwrap();
        db.exec("UPDATE audotics_trainer.run_jobs SET state = 'succeeded'").await;
        db.exec("UPDATE audotics_trainer.retrain_requests SET answered_at = now()").await;
        claim.params
    };

    // Refreshes alone: the run refreshes.
    coord::record_request(&db.pool, &with("r1", refresh())).await.unwrap();
    coord::record_request(&db.pool, &with("r2", refresh())).await.unwrap();
    assert_eq!(claim_params().await, refresh());

    // A plain retrain, then a newer refresh (the timer's, say): the run trains, keeping the rest.
    let epochs = Params { epochs: Some(3), ..Default::default() };
    coord::record_request(&db.pool, &with("t1", Some(epochs.clone()))).await.unwrap();
    coord::record_request(&db.pool, &with("r3", refresh())).await.unwrap();
    assert_eq!(claim_params().await, Some(Params::default()), "the refresh's params without the refresh");

    // A retrain without params beside a refresh: the run trains too.
    coord::record_request(&db.pool, &with("t2", None)).await.unwrap();
    coord::record_request(&db.pool, &with("r4", refresh())).await.unwrap();
    assert_eq!(claim_params().await.and_then(|p| p.refresh), None);
}
