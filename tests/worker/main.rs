//! The retrain worker against the real RabbitMQ, Postgres and an S3 server: real worker processes,
//! real signals, a real broker restart. Each test has its own vhost, database and store; the tests
//! run one at a time (one of them restarts the broker).

mod chaos;
mod freshness;
mod harness;
mod kinds;
mod limits;
#[allow(dead_code)]
#[path = "../postgres/helpers.rs"]
mod pg;
mod routing;
#[allow(dead_code)]
#[path = "../storage/s3.rs"]
mod s3;

use std::time::{Duration, Instant};

use harness::*;

const MINUTE: Duration = Duration::from_secs(60);

struct Setup {
    vhost: Vhost,
    db: TestDb,
    store: tempfile::TempDir,
    logs: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Self {
        Self {
            vhost: Vhost::new(),
            db: seeded_db().await,
            store: tempfile::tempdir().unwrap(),
            logs: tempfile::tempdir().unwrap(),
        }
    }

    fn env(&self, extra: &[(&str, &str)]) -> WorkerEnv {
        WorkerEnv {
            database_url: self.db.url.clone(),
            amqp_url: self.vhost.url.clone(),
            store: self.store.path().to_str().unwrap().to_string(),
            logs: self.logs.path().to_path_buf(),
            extra: extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            wrapper: Vec::new(),
        }
    }

    /// Runs that overlapped in time, from the ledger (pairs of run ids).
    async fn overlapping_runs(&self) -> i64 {
        self.db
            .count(
                "SELECT count(*) FROM audotics_trainer.training_runs a JOIN audotics_trainer.training_runs b
                 ON a.id < b.id AND a.model = b.model
                 AND a.started_at < coalesce(b.finished_at, now()) AND b.started_at < coalesce(a.finished_at, now())",
            )
            .await
    }
}

/// Starts worker `w1`, sends request `id`, and waits until its run has checkpointed `epochs` epochs;
/// returns the worker, the request id and the newest checkpoint position.
async fn run_until_checkpoint(
    setup: &Setup,
    env: &WorkerEnv,
    id: &str,
    epochs: usize,
) -> (Worker, String, (usize, usize)) {
    let mut worker = env.spawn("w1");
    worker.wait_ready(MINUTE).await;
    let id = Publisher::new(&setup.vhost).await.request(id).await;
    let store = setup.store.path().to_path_buf();
    let at = eventually(2 * MINUTE, &format!("the run's checkpoint of epoch {epochs}"), || async {
        newest_checkpoint(&store).filter(|(epoch, _)| *epoch >= epochs)
    })
    .await;
    (worker, id, at)
}

/// A setup with its event listener, one ready worker (`w1`, with `extra` settings) and a publisher.
async fn one_worker(extra: &[(&str, &str)]) -> (Setup, Events, Worker, Publisher) {
    let setup = Setup::new().await;
    let events = Events::listen(&setup.vhost).await;
    let mut worker = setup.env(extra).spawn("w1");
    worker.wait_ready(MINUTE).await;
    let publisher = Publisher::new(&setup.vhost).await;
    (setup, events, worker, publisher)
}

/// Points `env`'s workers at `s3`, bucket `models`, prefix `published`.
fn use_s3(env: &mut WorkerEnv, s3: &s3::S3Server) {
    env.store = "s3://models/published".into();
    env.extra.extend(
        [
            ("AWS_ENDPOINT", s3.endpoint()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY.into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}-{}", uuid::Uuid::new_v4())).collect()
}

#[tokio::test]
async fn one_request_gives_one_model_ready_whose_artifacts_exist_match_and_load() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let s3 = s3::S3Server::start();
    let mut env = setup.env(&[]);
    use_s3(&mut env, &s3);
    let events = Events::listen(&setup.vhost).await;
    let mut worker = env.spawn("w1");
    worker.wait_ready(MINUTE).await;
    let started = Instant::now();
    let id = Publisher::new(&setup.vhost).await.request("only-request").await;
    events.wait_satisfied(std::slice::from_ref(&id), 2 * MINUTE).await;
    let seconds = started.elapsed().as_secs_f64();
    let ready = events.events("model-ready");
    assert_eq!(ready.len(), 1, "{ready:#?}");
    let event = &ready[0];
    assert_eq!(event["schema_version"], 1);
    assert_eq!(event["model"], "content-based");
    assert_eq!(event["satisfies"], serde_json::json!([id]));
    let version = event["version"].as_str().unwrap();
    assert_eq!(
        event["event_id"].as_str().unwrap(),
        audotics_trainer::worker::events::model_ready_id("content-based", version).to_string()
    );
    let metrics = &event["metrics"];
    assert!(metrics["recall_at_10"].as_f64().unwrap() > 0.0);
    // Scored on the time-ordered hold-out, with every baseline on the same pairs and the epoch chosen.
    assert_eq!(metrics["holdout"], "time", "{metrics:#}");
    assert!(metrics["heldout_pairs"].as_u64().unwrap() > 0);
    assert!(metrics["recall_at_10_se"].as_f64().unwrap() > 0.0);
    for baseline in ["random", "popularity", "raw_features", "item_cf"] {
        assert!(metrics["baselines"][baseline]["recall_at_10"].is_f64(), "{baseline}: {metrics:#}");
    }
    assert!((1..=3).contains(&metrics["best_epoch"].as_u64().unwrap()), "{metrics:#}");
    assert_eq!(metrics["epochs_trained"], 3);
    assert_eq!(metrics["stop_reason"], "max_epochs");
    assert_eq!(event["data"]["interactions"].as_u64().unwrap(), 6000);
    assert!(event["data"]["newest_interaction_at"].is_string());

    // Every artifact is a full s3:// URL that exists and matches the manifest's sha256.
    let store = s3.store("published");
    let prefix = "s3://models/published/";
    for name in ["keras", "metadata", "weights", "embeddings", "neighbours", "tfjs", "manifest", "model_card"] {
        let url = event["artifacts"][name].as_str().unwrap_or_else(|| panic!("no artifact {name}"));
        assert!(url.starts_with(prefix), "{url}");
        assert!(store.exists(&url[prefix.len()..]).await.unwrap(), "{url} is missing");
    }
    let manifest_key = &event["artifacts"]["manifest"].as_str().unwrap()[prefix.len()..];
    let manifest = audotics_trainer::publish::versions::read_manifest(&store, manifest_key, None).await.unwrap();
    audotics_trainer::publish::versions::verify(&store, &manifest).await.unwrap();
    let latest = audotics_trainer::publish::versions::read_latest(&store, "content-based").await.unwrap().unwrap();
    assert_eq!(latest.version, version);

    // Keras 3 loads the archive from the store and predicts the published embeddings.
    let keras_key = &event["artifacts"]["keras"].as_str().unwrap()[prefix.len()..];
    let work = tempfile::tempdir().unwrap();
    let keras_path = work.path().join("model.keras");
    std::fs::write(&keras_path, store.get(keras_key).await.unwrap()).unwrap();
    let inputs = consumer_inputs(&setup.db, &store, event, prefix, work.path()).await;
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-consumers/bin/python");
    assert!(python.exists(), "no {} — run scripts/consumers.sh", python.display());
    let out = std::process::Command::new(python)
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/consumers/keras_check.py"))
        .args([&keras_path, &inputs])
        .env("KERAS_BACKEND", "jax")
        .env("JAX_PLATFORMS", "cpu")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Keras check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let runs = setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs WHERE status = 'succeeded'").await;
    assert_eq!(runs, 1);
    eprintln!("figures: 1 request in, 1 model-ready out, 1 run, {seconds:.1} s request → model-ready");
}

/// The features of the published track ids, standardised with the published means and stds, and
/// the published embeddings: what `keras_check.py` compares.
async fn consumer_inputs(
    db: &TestDb,
    store: &audotics_trainer::publish::store::ModelStore,
    event: &serde_json::Value,
    prefix: &str,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    use sqlx::Row;
    let key = |name: &str| event["artifacts"][name].as_str().unwrap()[prefix.len()..].to_string();
    let meta: serde_json::Value = serde_json::from_slice(&store.get(&key("metadata")).await.unwrap()).unwrap();
    let emb_bytes = store.get(&key("embeddings")).await.unwrap();
    let emb = candle_core::safetensors::load_buffer(&emb_bytes, &candle_core::Device::Cpu).unwrap();
    let embeddings: Vec<Vec<f32>> = emb["embeddings"].to_vec2().unwrap();
    let names: Vec<String> =
        meta["feature_names"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let f = |k: &str| -> Vec<f64> { meta[k].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
    let (means, stds) = (f("feature_means"), f("feature_stds"));
    let columns = names.iter().map(|n| format!("\"{n}\"::float8")).collect::<Vec<_>>().join(", ");
    let mut features = Vec::new();
    for id in meta["track_ids"].as_array().unwrap() {
        let row =
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {columns} FROM \"TrackFeatures\" WHERE \"trackId\" = $1")))
                .bind(id.as_str().unwrap())
                .fetch_one(&db.pool)
                .await
                .unwrap();
        features
            .push((0..names.len()).map(|i| ((row.get::<f64, _>(i) - means[i]) / stds[i]) as f32).collect::<Vec<_>>());
    }
    let path = dir.join("inputs.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({"features": features, "embeddings": embeddings})).unwrap(),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn a_burst_of_200_requests_across_3_workers_runs_at_most_twice_and_answers_every_request() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    // Long enough runs that the whole burst arrives within one (checked below, not assumed).
    let env = setup.env(&[("AUDOTICS_EPOCHS", "200")]);
    let events = Events::listen(&setup.vhost).await;
    let mut workers: Vec<Worker> = (1..=3).map(|i| env.spawn(&format!("w{i}"))).collect();
    for w in &mut workers {
        w.wait_ready(MINUTE).await;
    }
    let publisher = Publisher::new(&setup.vhost).await;
    let started = Instant::now();
    let requests = ids("burst", 200);
    for id in &requests {
        publisher.request(id).await;
    }
    let publish_ms = started.elapsed().as_millis() as i64;
    events.wait_satisfied(&requests, 3 * MINUTE).await;
    let seconds = started.elapsed().as_secs_f64();
    let shortest_run_ms = setup
        .db
        .count("SELECT (extract(epoch FROM min(finished_at - started_at)) * 1000)::bigint FROM audotics_trainer.training_runs")
        .await;
    assert!(
        publish_ms < shortest_run_ms,
        "the test's premise failed: publishing the burst took {publish_ms} ms, a run only {shortest_run_ms} ms \
         (a burst longer than a run may rightly cause more runs); raise AUDOTICS_EPOCHS"
    );
    let runs = setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs").await;
    assert!((1..=2).contains(&runs), "{runs} runs for one burst");
    assert_eq!(setup.overlapping_runs().await, 0, "two runs of the model overlapped");
    let unanswered =
        setup.db.count("SELECT count(*) FROM audotics_trainer.retrain_requests WHERE answered_at IS NULL").await;
    assert_eq!(unanswered, 0);
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.retrain_requests").await, 200);
    // Every delivery was acked: once the consumers are gone, nothing is left in the queue.
    for w in &mut workers {
        w.signal("TERM");
        assert!(w.wait_exit(MINUTE).await.unwrap().success(), "{}", w.log_text());
    }
    assert_eq!(queue_depth(&setup.vhost, &audotics_trainer::broker::model_queue("content-based")).await, 0);
    let ready = events.events("model-ready");
    eprintln!(
        "figures: 200 requests in ({publish_ms} ms to publish), {} model-ready out, {runs} runs (shortest \
         {shortest_run_ms} ms), {seconds:.1} s to answer all",
        ready.len()
    );
}

async fn queue_depth(vhost: &Vhost, queue: &str) -> u32 {
    queue_state(vhost, queue).await.0
}

/// Messages in `queue` (ready and unacked) and its consumers.
async fn queue_state(vhost: &Vhost, queue: &str) -> (u32, u32) {
    let connection = audotics_trainer::broker::connect(&vhost.settings()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let q = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    (q.message_count(), q.consumer_count())
}

#[tokio::test]
async fn the_same_request_delivered_twice_runs_once() {
    let _serial = serial().await;
    let (setup, events, worker, publisher) = one_worker(&[]).await;
    let first = publisher.request("dup-request").await;
    events.wait_satisfied(std::slice::from_ref(&first), 2 * MINUTE).await;
    // Again, with the same event_id; then a different request, whose answer proves the duplicate
    // was consumed before it (one queue, one consumer: in order).
    publisher.request("dup-request").await;
    let second = publisher.request("other-request").await;
    let all = events.wait_satisfied(std::slice::from_ref(&second), 2 * MINUTE).await;
    let runs = setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs").await;
    assert_eq!(runs, 2, "one run per distinct request");
    let answering_dup =
        all.iter().filter(|r| r.body["satisfies"].as_array().unwrap().iter().any(|v| v == "dup-request")).count();
    assert_eq!(answering_dup, 1, "the duplicate was answered again");
    assert!(
        worker.metrics().await.contains("audotics_retrain_requests_total{outcome=\"duplicate\"} 1"),
        "{}",
        worker.metrics().await
    );
}

#[tokio::test]
async fn a_killed_worker_s_run_is_resumed_from_its_checkpoint_by_another() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let env = setup.env(&[("AUDOTICS_EPOCHS", "300"), ("WORKER_LEASE_SECONDS", "3")]);
    let events = Events::listen(&setup.vhost).await;
    let (mut first, id, at) = run_until_checkpoint(&setup, &env, "kill-me", 3).await;
    first.signal("KILL");
    first.wait_exit(MINUTE).await.expect("kill -9 ends the worker");
    let started = Instant::now();
    let mut second = env.spawn("w2");
    second.wait_ready(MINUTE).await;
    events.wait_satisfied(std::slice::from_ref(&id), 3 * MINUTE).await;
    let resumed = second.log_lines("resumed from checkpoint");
    assert_eq!(resumed.len(), 1, "{}", second.log_text());
    let epoch = resumed[0]["fields"]["epoch"].as_u64().unwrap() as usize;
    assert!(epoch >= at.0, "resumed from epoch {epoch}, but epoch {} was checkpointed before the kill", at.0);
    assert_eq!(second.log_lines("took over a run whose lease had expired").len(), 1);
    assert_eq!(setup.db.count("SELECT takeovers::int8 FROM audotics_trainer.run_jobs").await, 1);
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs").await, 1);
    let ready = events.events("model-ready");
    assert_eq!(ready.len(), 1);
    let meta_url = ready[0]["artifacts"]["metadata"].as_str().unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(meta_url.strip_prefix("file://").unwrap()).unwrap()).unwrap();
    assert_eq!(meta["epochs_completed"], 300);
    eprintln!(
        "figures: killed after epoch {}, resumed from epoch {epoch}, model-ready {:.1} s after the second worker started",
        at.0,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_is_recovered_and_the_model_published() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let env = setup.env(&[("AUDOTICS_EPOCHS", "150")]);
    let events = Events::listen(&setup.vhost).await;
    let mut worker = env.spawn("w1");
    worker.wait_ready(MINUTE).await;
    let id = Publisher::new(&setup.vhost).await.request("survive-restart").await;
    let store = setup.store.path().to_path_buf();
    eventually(2 * MINUTE, "the run's first checkpoint", || async { newest_checkpoint(&store) }).await;
    assert!(
        events.events("model-ready").is_empty(),
        "the test's premise: the run is still going when the broker stops"
    );
    let started = Instant::now();
    // Down longer than a reconnect's backoff: once, a connection lapin's own recovery revived late
    // kept a second consumer that nobody read (found by the fault suite).
    tokio::task::block_in_place(|| restart_broker(Duration::from_secs(15)));
    events.wait_satisfied(std::slice::from_ref(&id), 3 * MINUTE).await;
    worker.wait_ready(MINUTE).await; // consuming again, on a new connection
    // And it still takes requests after the restart.
    let after = Publisher::new(&setup.vhost).await.request("after-restart").await;
    events.wait_satisfied(std::slice::from_ref(&after), 3 * MINUTE).await;
    assert!(worker.child.try_wait().unwrap().is_none(), "the worker exited:\n{}", worker.log_text());
    let (messages, consumers) =
        queue_state(&setup.vhost, &audotics_trainer::broker::model_queue("content-based")).await;
    assert_eq!((messages, consumers), (0, 1), "one worker, one consumer (no revived stale one), queue empty");
    eprintln!(
        "figures: broker down 15 s mid-run; model-ready {:.1} s after the restart began; supervisor rebuilds {}",
        started.elapsed().as_secs_f64(),
        worker.log_lines("broker session lost; reconnecting").len(),
    );
}

#[tokio::test]
async fn thirty_seconds_without_the_database_loses_nothing() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let pg_port = url::Url::parse(&setup.db.url).unwrap().port().unwrap_or(5432);
    let proxy = Proxy::start(pg_port).await;
    let mut env = setup.env(&[]);
    env.database_url = via_port(&setup.db.url, proxy.port);
    let events = Events::listen(&setup.vhost).await;
    let mut worker = env.spawn("w1");
    worker.wait_ready(MINUTE).await;
    let publisher = Publisher::new(&setup.vhost).await;
    let before = publisher.request("before-outage").await;
    events.wait_satisfied(std::slice::from_ref(&before), 2 * MINUTE).await;

    proxy.cut();
    let outage = Instant::now();
    let during = ids("during-outage", 5);
    for id in &during {
        publisher.request(id).await;
    }
    eventually(MINUTE, "/readyz to report the database down", || async {
        worker.readyz().await.filter(|(status, body)| *status == 503 && body["database"] == false)
    })
    .await;
    // The outage itself lasts 30 s; that is the fault being injected, not a wait for an outcome.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    proxy.restore();
    events.wait_satisfied(&during, 3 * MINUTE).await;
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.retrain_requests").await, 6);
    assert_eq!(
        setup.db.count("SELECT count(*) FROM audotics_trainer.retrain_requests WHERE answered_at IS NULL").await,
        0
    );
    assert!(worker.metrics().await.contains("audotics_database_errors_total"), "no database error was counted");
    worker.wait_ready(MINUTE).await;
    eprintln!(
        "figures: 30 s database outage; 5 requests sent during it, all answered {:.1} s after it began",
        outage.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn each_malformed_request_is_dead_lettered_with_its_reason_and_the_worker_stays_ready() {
    let _serial = serial().await;
    let (setup, events, worker, publisher) = one_worker(&[]).await;
    let oversized = format!(r#"{{"model":"content-based","reason":"{}"}}"#, "x".repeat(70 * 1024));
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("bad-json", "malformed_json", b"{\"model\": ".to_vec()),
        ("bad-schema", "unsupported_schema_version", br#"{"schema_version": 2, "model": "content-based"}"#.to_vec()),
        ("bad-model", "unknown_model", br#"{"model": "collaborative"}"#.to_vec()),
        ("bad-size", "oversized", oversized.into_bytes()),
        ("bad-params", "invalid_params", br#"{"model": "content-based", "params": {"epochs": 100000}}"#.to_vec()),
        ("bad-field", "invalid_field", br#"{"model": "content-based", "requested_at": "yesterday"}"#.to_vec()),
    ];
    for (id, _, body) in &cases {
        publisher.raw("retrain.content-based", body, id).await;
    }
    let valid = publisher.request("valid-after-bad").await;
    events.wait_satisfied(std::slice::from_ref(&valid), 2 * MINUTE).await;
    events
        .wait_for(MINUTE, "every malformed case dead-lettered", |all| {
            all.iter().filter(|r| r.dead).count() >= cases.len()
        })
        .await;
    let dead = events.dead_letters();
    assert_eq!(dead.len(), cases.len(), "{dead:#?}");
    for (id, reason, body) in &cases {
        let letter =
            dead.iter().find(|r| r.raw == *body).unwrap_or_else(|| panic!("{id} was not dead-lettered byte for byte"));
        assert_eq!(letter.headers.get("x-audotics-dead-letter-reason").map(String::as_str), Some(*reason), "{id}");
        assert!(!letter.headers["x-audotics-dead-letter-detail"].is_empty());
    }
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.retrain_requests").await, 1);
    let (status, _) = worker.readyz().await.unwrap();
    assert_eq!(status, 200);
    let metrics = worker.metrics().await;
    for (_, reason, _) in &cases {
        assert!(
            metrics.contains(&format!("audotics_dead_letters_total{{reason=\"{reason}\"}} 1")),
            "{reason}: {metrics}"
        );
    }
}

#[tokio::test]
async fn sigterm_mid_run_exits_cleanly_within_the_grace_period_and_the_run_completes_later() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let env = setup.env(&[("AUDOTICS_EPOCHS", "400"), ("WORKER_GRACE_SECONDS", "20")]);
    let events = Events::listen(&setup.vhost).await;
    let (mut first, id, _) = run_until_checkpoint(&setup, &env, "terminate-me", 2).await;
    let signalled = Instant::now();
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(25)).await.expect("no exit within the grace period");
    let exit_seconds = signalled.elapsed().as_secs_f64();
    assert!(status.success(), "exit status {status}:\n{}", first.log_text());
    assert!(first.log_text().contains("lease released for another worker"), "{}", first.log_text());
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.run_jobs WHERE state = 'retry'").await, 1);
    assert!(events.events("model-ready").is_empty());

    let mut second = env.spawn("w2");
    second.wait_ready(MINUTE).await;
    events.wait_satisfied(std::slice::from_ref(&id), 3 * MINUTE).await;
    let resumed = second.log_lines("resumed from checkpoint");
    assert_eq!(resumed.len(), 1, "{}", second.log_text());
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.run_jobs WHERE state = 'succeeded'").await, 1);
    eprintln!(
        "figures: SIGTERM → exit 0 in {exit_seconds:.2} s; resumed at epoch {} step {}",
        resumed[0]["fields"]["epoch"], resumed[0]["fields"]["step"]
    );
}

#[tokio::test]
async fn a_worse_model_is_rejected_by_the_quality_gate_and_its_request_answered() {
    let _serial = serial().await;
    let (setup, events, _worker, publisher) =
        one_worker(&[("QUALITY_TOLERANCE", "0.0"), ("AUDOTICS_EPOCHS", "8")]).await;
    let good = publisher.request("good-model").await;
    events.wait_satisfied(std::slice::from_ref(&good), 2 * MINUTE).await;
    // Planted: the current version's own published figure says 0. A gate that compared each
    // version's own figure would now pass any candidate; this one scores the current version's
    // embeddings on the candidate's held-out pairs instead.
    let good_version = events.events("model-ready")[0]["version"].as_str().unwrap().to_string();
    let metadata_path = setup
        .store
        .path()
        .join(format!("content-based/versions/{good_version}/{}", audotics_trainer::publish::layout::METADATA));
    let mut metadata: serde_json::Value = serde_json::from_slice(&std::fs::read(&metadata_path).unwrap()).unwrap();
    metadata["final_metrics"]["recall_at_10"] = serde_json::json!(0.0);
    std::fs::write(&metadata_path, serde_json::to_vec(&metadata).unwrap()).unwrap();
    // One epoch at a learning rate too small to move the weights: worse than the current version.
    // Another validation split, so the two versions' own figures are on different held-out pairs:
    // the gate must score the current version on the candidate's.
    let body = br#"{"model": "content-based", "event_id": "bad-model", "params": {"epochs": 1, "learning_rate": 0.0000001, "validation_split": 0.3}}"#;
    publisher.raw("retrain.content-based", body, "bad-model").await;
    events.wait_satisfied(&["bad-model".to_string()], 2 * MINUTE).await;
    let rejected = events.events("model-rejected");
    assert_eq!(rejected.len(), 1, "{:#?}", events.all());
    let ready = &events.events("model-ready")[0];
    let current = ready["version"].clone();
    let r = &rejected[0];
    assert_eq!(r["current_version"], current);
    assert!(r["metrics"]["recall_at_10"].as_f64() < r["current_metrics"]["recall_at_10"].as_f64());
    assert!(r["metrics"]["recall_at_10"].as_f64().unwrap() > 0.0, "it would win against the planted own figure");
    assert!(r["failed_checks"].as_array().unwrap().contains(&serde_json::json!("not_worse_than_current")), "{r:#}");
    assert_eq!(r["current_metrics"]["heldout_pairs"], r["metrics"]["heldout_pairs"], "scored on the candidate's pairs");
    assert_ne!(r["current_metrics"]["heldout_pairs"], ready["metrics"]["heldout_pairs"], "not on its own");
    eprintln!(
        "figures: candidate {} vs current {} rescored on the candidate's {} pairs (its own figure {} on {} pairs); failed {}",
        r["metrics"]["recall_at_10"],
        r["current_metrics"]["recall_at_10"],
        r["metrics"]["heldout_pairs"],
        ready["metrics"]["recall_at_10"],
        ready["metrics"]["heldout_pairs"],
        r["failed_checks"]
    );
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(setup.store.path().join("content-based/latest.json")).unwrap()).unwrap();
    assert_eq!(latest["version"], current, "latest.json moved to a rejected version");
    let versions = std::fs::read_dir(setup.store.path().join("content-based/versions")).unwrap().count();
    assert_eq!(versions, 1, "the rejected version was uploaded");
}

#[tokio::test]
async fn a_first_version_that_loses_to_popularity_is_rejected_with_the_floor_and_its_figures() {
    let _serial = serial().await;
    let (setup, events, _worker, publisher) = one_worker(&[("AUDOTICS_QUALITY_FLOORS", "true")]).await;
    // One epoch at a learning rate too small to move the weights: an untrained encoder.
    let body =
        br#"{"model": "content-based", "event_id": "untrained", "params": {"epochs": 1, "learning_rate": 0.0000001}}"#;
    publisher.raw("retrain.content-based", body, "untrained").await;
    events.wait_satisfied(&["untrained".to_string()], 2 * MINUTE).await;
    let rejected = events.events("model-rejected");
    assert_eq!(rejected.len(), 1, "{:#?}", events.all());
    let r = &rejected[0];
    assert_eq!(r["current_version"], serde_json::Value::Null, "the model's first version");
    assert!(r["failed_checks"].as_array().unwrap().contains(&serde_json::json!("beats_popularity")), "{r:#}");
    let popularity = r["metrics"]["baselines"]["popularity"]["recall_at_10"].as_f64().unwrap();
    assert!(r["reason"].as_str().unwrap().contains(&format!("popularity's {popularity:.4}")), "{r:#}");
    assert_eq!(r["metrics"]["holdout"], "time", "the database's history is split by time");
    assert!(r["metrics"]["baselines"]["item_cf"]["recall_at_10"].as_f64().is_some());
    assert!(!setup.store.path().join("content-based/latest.json").exists(), "nothing is latest");
    let ledger = "SELECT count(*) FROM audotics_trainer.training_runs WHERE status = 'rejected'
                  AND error LIKE 'quality gate:%' AND metrics #>> '{quality_gate,checks,0,name}' = 'beats_popularity'";
    assert_eq!(setup.db.count(ledger).await, 1, "the ledger says why, with every check's figures");
    eprintln!("figures: {}", r["reason"]);
}

#[tokio::test]
async fn the_retrain_command_publishes_a_request_the_worker_answers() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let events = Events::listen(&setup.vhost).await;
    let mut worker = setup.env(&[]).spawn("w1");
    worker.wait_ready(MINUTE).await;
    let retrain = |args: &[&str]| {
        std::process::Command::new(BIN)
            .arg("retrain")
            .args(args)
            .env("AMQP_URL", &setup.vhost.url)
            .env("AUDOTICS_LOG_FORMAT", "json")
            .output()
            .unwrap()
    };
    let out = retrain(&["--model", "content-based", "--reason", "operator asked", "--params", r#"{"epochs": 2}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let event_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(uuid::Uuid::parse_str(&event_id).is_ok(), "{event_id}");
    events.wait_satisfied(std::slice::from_ref(&event_id), 2 * MINUTE).await;
    let reason: String = sqlx::query_scalar("SELECT reason FROM audotics_trainer.retrain_requests WHERE event_id = $1")
        .bind(&event_id)
        .fetch_one(&setup.db.pool)
        .await
        .unwrap();
    assert_eq!(reason, "operator asked");
    let meta_url = events.events("model-ready")[0]["artifacts"]["metadata"].as_str().unwrap().to_string();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(meta_url.strip_prefix("file://").unwrap()).unwrap()).unwrap();
    assert_eq!(meta["epochs_completed"], 2, "the request's params were applied");

    // What the worker would dead-letter, the command refuses before sending.
    let out = retrain(&["--params", r#"{"epochs": 0}"#]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid_params"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The runbook's rollback and dead-letter replay steps, dry run first, against the local services.
#[tokio::test]
async fn runbook_rollback_and_dead_letter_replay_work_against_the_local_services() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let events = Events::listen(&setup.vhost).await;
    let env = setup.env(&[("QUALITY_TOLERANCE", "1.0")]);
    let mut worker = env.spawn("w1");
    worker.wait_ready(MINUTE).await;
    let publisher = Publisher::new(&setup.vhost).await;
    let first = publisher.request("first-version").await;
    events.wait_satisfied(std::slice::from_ref(&first), 2 * MINUTE).await;
    let second = publisher.request("second-version").await;
    events.wait_satisfied(std::slice::from_ref(&second), 2 * MINUTE).await;
    let versions: Vec<String> =
        events.events("model-ready").iter().map(|e| e["version"].as_str().unwrap().to_string()).collect();
    assert_eq!(versions.len(), 2);
    let store = setup.store.path().to_str().unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("MODEL_STORE_URL", store)
            .env("AMQP_URL", &setup.vhost.url)
            .env("AUDOTICS_LOG_FORMAT", "json")
            .output()
            .unwrap()
    };
    let latest = || -> String {
        let bytes = std::fs::read(setup.store.path().join("content-based/latest.json")).unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["version"].as_str().unwrap().to_string()
    };
    assert_eq!(latest(), versions[1]);

    // Rollback: to a version that does not exist → refused; by default → the previous version.
    let out = cli(&["rollback", "--to", "20990101T000000Z-ffffff"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no manifest"));
    assert_eq!(latest(), versions[1]);
    let out = cli(&["rollback"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(latest(), versions[0]);
    // A damaged version is refused.
    let weights = setup.store.path().join(format!("content-based/versions/{}/weights.safetensors", versions[1]));
    std::fs::write(&weights, b"damaged").unwrap();
    let out = cli(&["rollback", "--to", &versions[1]]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(latest(), versions[0]);

    // A request for a model this worker does not serve is dead-lettered…
    publisher.raw("retrain.other-model", br#"{"model": "other-model", "event_id": "for-other"}"#, "for-other").await;
    events.wait_for(MINUTE, "the dead letter", |all| all.iter().any(|r| r.dead)).await;
    // (the test's listener consumed it from the dead-letter queue; put one back as RabbitMQ would hold it)
    let dead = events.dead_letters().pop().unwrap();
    assert_eq!(dead.headers["x-audotics-dead-letter-reason"], "unknown_model");
    drop(events);
    // Dropping the listener closes its connection in the background: until the broker has let its
    // consumer go, a letter put back would be delivered to it (and held, unacked) instead of waiting.
    eventually(MINUTE, "the old listener to leave the dead-letter queue", || async {
        (queue_state(&setup.vhost, audotics_trainer::broker::DEAD_LETTER_QUEUE).await.1 == 0).then_some(())
    })
    .await;
    let events = Events::listen_events_only(&setup.vhost).await;
    republish_dead_letter(&setup.vhost, &dead).await;
    // …the dry run lists it and leaves it…
    let out = cli(&["replay-dead-letters"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(listed["reason"], "unknown_model");
    assert_eq!(listed["message_id"], "for-other");
    assert_eq!(queue_depth(&setup.vhost, audotics_trainer::broker::DEAD_LETTER_QUEUE).await, 1);
    // …and once a worker serves that model, --replay sends it back and it is answered.
    worker.signal("TERM");
    assert!(worker.wait_exit(MINUTE).await.unwrap().success());
    let mut both =
        setup.env(&[("QUALITY_TOLERANCE", "1.0"), ("WORKER_MODELS", "content-based,other-model")]).spawn("w2");
    both.wait_ready(MINUTE).await;
    let out = cli(&["replay-dead-letters", "--replay"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(queue_depth(&setup.vhost, audotics_trainer::broker::DEAD_LETTER_QUEUE).await, 0);
    events.wait_satisfied(&["for-other".to_string()], 2 * MINUTE).await;
}

/// Puts a recorded dead letter back on the dead-letter queue, headers and all.
async fn republish_dead_letter(vhost: &Vhost, letter: &Recorded) {
    use lapin::types::{AMQPValue, FieldTable};
    let connection = audotics_trainer::broker::connect(&vhost.settings()).await.unwrap();
    let channel = audotics_trainer::broker::confirm_channel(&connection).await.unwrap();
    let mut headers = FieldTable::default();
    for (k, v) in &letter.headers {
        headers.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    let id = letter.body["event_id"].as_str().unwrap_or_default().to_string();
    audotics_trainer::broker::publish_json(
        &channel,
        audotics_trainer::broker::DEAD_LETTER_EXCHANGE,
        &letter.routing_key,
        &letter.raw,
        &id,
        Some(headers),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_worker_paused_past_its_lease_loses_the_run_and_the_version_is_published_once() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let env = setup.env(&[("AUDOTICS_EPOCHS", "300"), ("WORKER_LEASE_SECONDS", "3")]);
    let events = Events::listen(&setup.vhost).await;
    let (mut first, id, _) = run_until_checkpoint(&setup, &env, "pause-me", 3).await;
    first.signal("STOP");
    let mut second = env.spawn("w2");
    second.wait_ready(MINUTE).await;
    eventually(MINUTE, "the second worker to take the run over", || async {
        (!second.log_lines("took over a run whose lease had expired").is_empty()).then_some(())
    })
    .await;
    first.signal("CONT");
    eventually(MINUTE, "the paused worker to notice that its lease is gone", || async {
        (!first.log_lines("lease lost: another worker owns the run now; stopping").is_empty()).then_some(())
    })
    .await;
    events.wait_satisfied(std::slice::from_ref(&id), 3 * MINUTE).await;
    first.wait_ready(MINUTE).await; // it carries on as a worker
    let ready = events.events("model-ready");
    let ids: std::collections::BTreeSet<_> = ready.iter().map(|e| e["event_id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "one version, one event id: {ready:#?}");
    let versions = std::fs::read_dir(setup.store.path().join("content-based/versions")).unwrap().count();
    assert_eq!(versions, 1);
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.run_jobs WHERE state = 'succeeded'").await, 1);
    assert_eq!(
        setup.db.count("SELECT count(*) FROM audotics_trainer.retrain_requests WHERE answered_at IS NULL").await,
        0
    );
    // The paused worker winds its run down (a checkpoint at the batch boundary, the fenced ledger
    // write) on its own time: wait for its end rather than assume it came before the new owner's.
    let lost = eventually(MINUTE, "the paused worker's end of the run", || async {
        Some(first.log_lines("run ended")).filter(|lines| !lines.is_empty())
    })
    .await;
    assert_eq!(lost.len(), 1, "{}", first.log_text());
    assert_eq!(lost[0]["fields"]["status"], "lease_lost");
    // The paused worker's own end of the run (stopped) was fenced off the ledger: the row is the
    // new owner's, and ended when the new owner finished (found by the fault suite).
    assert_eq!(first.log_lines("the run's lease is gone: its new owner records its end in the ledger").len(), 1);
    assert_eq!(
        setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs WHERE status = 'succeeded'").await,
        1
    );
}

#[tokio::test]
async fn a_request_the_newest_version_already_covers_is_answered_without_training() {
    let _serial = serial().await;
    let (setup, events, worker, publisher) = one_worker(&[]).await;
    let first = publisher.request("trains").await;
    events.wait_satisfied(std::slice::from_ref(&first), 2 * MINUTE).await;
    let v1 = events.events("model-ready")[0].clone();
    let watermark = v1["data"]["newest_interaction_at"].as_str().unwrap().to_string();
    // Covered (exactly at the watermark): answered by v1 again, same event id, no run.
    let body = serde_json::json!({"model": "content-based", "event_id": "covered", "interactions_until": watermark});
    publisher.raw("retrain.content-based", &serde_json::to_vec(&body).unwrap(), "covered").await;
    let all = events.wait_satisfied(&["covered".to_string()], MINUTE).await;
    let answer = all.iter().find(|r| r.body["satisfies"] == serde_json::json!(["covered"])).unwrap();
    assert_eq!(answer.body["event_id"], v1["event_id"]);
    assert_eq!(answer.body["version"], v1["version"]);
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs").await, 1);
    // Not covered (a millisecond later): a run.
    let later = chrono::DateTime::parse_from_rfc3339(&watermark).unwrap() + chrono::Duration::milliseconds(1);
    let body = serde_json::json!({"model": "content-based", "event_id": "not-covered", "interactions_until": later.to_rfc3339()});
    publisher.raw("retrain.content-based", &serde_json::to_vec(&body).unwrap(), "not-covered").await;
    events.wait_satisfied(&["not-covered".to_string()], 2 * MINUTE).await;
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs").await, 2);
    assert!(worker.metrics().await.contains("audotics_retrain_requests_total{outcome=\"satisfied\"} 1"));
}

/// The fault suite's short profile (issue 7): three workers, three models, a steady load with
/// bursts, and a nemesis on a random schedule (seed printed; `CHAOS_SEED` replays it). Longer runs:
/// RELIABILITY.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fault_suite_loses_nothing_and_every_invariant_holds() {
    let _serial = serial().await;
    chaos::run(chaos::Profile::from_env()).await;
}
