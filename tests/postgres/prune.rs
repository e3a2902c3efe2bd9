use std::time::Duration;

use audotics_trainer::db::prune::{Pruned, prune};

use crate::helpers::TestDb;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Rows of every state table, some past a 30-day horizon and some not, and some that must be kept
/// whatever their age (pending, unpublished, active, running).
async fn state_of_every_age(db: &TestDb) {
    audotics_trainer::db::migrate(&db.pool).await.unwrap();
    db.exec(
        "INSERT INTO audotics_trainer.run_jobs (run_id, model, state, finished_at) VALUES
           ('00000000-0000-0000-0000-000000000001', 'm', 'succeeded', now() - interval '40 days'),
           ('00000000-0000-0000-0000-000000000002', 'm', 'failed',    now() - interval '40 days'),
           ('00000000-0000-0000-0000-000000000003', 'm', 'succeeded', now() - interval '2 days'),
           ('00000000-0000-0000-0000-000000000004', 'm', 'retry',     NULL),
           ('00000000-0000-0000-0000-000000000005', 'n', 'failed',    now() - interval '40 days');
         INSERT INTO audotics_trainer.retrain_requests (event_id, model, run_id, answered_at, answer) VALUES
           ('old-answered',  'm', '00000000-0000-0000-0000-000000000001', now() - interval '40 days', 'model-ready'),
           ('new-answered',  'm', '00000000-0000-0000-0000-000000000003', now() - interval '2 days', 'model-ready'),
           ('old-waiting',   'm', '00000000-0000-0000-0000-000000000004', NULL, NULL),
           ('old-pending',   'm', NULL, NULL, NULL),
           ('old-for-n',     'n', '00000000-0000-0000-0000-000000000005', now() - interval '1 day', 'model-failed');
         UPDATE audotics_trainer.retrain_requests SET received_at = now() - interval '50 days';
         INSERT INTO audotics_trainer.outbox (event_id, routing_key, body, published_at) VALUES
           (gen_random_uuid(), 'model-ready.m', '{}', now() - interval '40 days'),
           (gen_random_uuid(), 'model-ready.m', '{}', now() - interval '1 day'),
           (gen_random_uuid(), 'model-ready.m', '{}', NULL);
         UPDATE audotics_trainer.outbox SET created_at = now() - interval '50 days';
         INSERT INTO audotics_trainer.training_runs (id, model, version, status, started_at, finished_at) VALUES
           ('00000000-0000-0000-0000-000000000001', 'm', 'v1', 'succeeded', now() - interval '41 days', now() - interval '40 days'),
           ('00000000-0000-0000-0000-000000000002', 'm', 'v2', 'succeeded', now() - interval '3 days', now() - interval '2 days'),
           ('00000000-0000-0000-0000-000000000003', 'm', 'v3', 'running', now() - interval '45 days', NULL);",
    )
    .await;
}

#[tokio::test]
async fn pruning_deletes_only_what_ended_before_the_horizon() {
    let db = TestDb::new().await;
    state_of_every_age(&db).await;
    let pruned = prune(&db.pool, 30 * DAY).await.unwrap().expect("nobody else holds the lock");
    // Runs 1 and 2 (ended 40 days ago) go, run 1 once its old request went before it; run 5 ended
    // as long ago but a recent request still names it, so it stays.
    assert_eq!(pruned, Pruned { retrain_requests: 1, outbox: 1, run_jobs: 2, training_runs: 1 });
    let left: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM audotics_trainer.retrain_requests ORDER BY event_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, ["new-answered", "old-for-n", "old-pending", "old-waiting"]);
    assert_eq!(db.count("SELECT count(*) FROM audotics_trainer.outbox WHERE published_at IS NULL").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM audotics_trainer.outbox").await, 2);
    assert_eq!(db.count("SELECT count(*) FROM audotics_trainer.run_jobs").await, 3, "recent, retrying, and n's");
    assert_eq!(db.count("SELECT count(*) FROM audotics_trainer.training_runs").await, 2, "recent and running");
    assert_eq!(prune(&db.pool, 30 * DAY).await.unwrap().unwrap(), Pruned::default());
}

#[tokio::test]
async fn a_second_pruner_skips_while_the_first_holds_the_lock() {
    let db = TestDb::new().await;
    state_of_every_age(&db).await;
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('audotics_trainer.prune'))")
        .execute(&mut *holder)
        .await
        .unwrap();
    assert_eq!(prune(&db.pool, 30 * DAY).await.unwrap(), None);
    holder.rollback().await.unwrap();
    assert!(prune(&db.pool, 30 * DAY).await.unwrap().is_some());
}
