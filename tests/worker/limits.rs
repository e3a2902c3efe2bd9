//! No single request or fault can take a model down. A run too large for the worker's memory is
//! refused before it trains, and a run that kills every worker that takes it is failed after
//! `RUN_MAX_ATTEMPTS` — in both cases the request behind it is published (real worker processes
//! under real memory limits: `RLIMIT_AS` through `prlimit`, a cgroup's OOM killer; restarted one
//! second after each exit as a Deployment restarts pods). A run has a deadline; a stalled database
//! stops a run inside its lease; shutdown keeps its grace period with the store hung; a worker's
//! clock does not decide version order.

use std::time::{Duration, Instant};

use super::*;

const GIB: u64 = 1 << 30;

/// A history with 30,707 training pairs per epoch, so that a batch of 20,000 is not clamped by the data.
async fn setup() -> Setup {
    let db = TestDb::new().await;
    db.seed_synthetic(&["--synthetic-tracks", "2000", "--synthetic-users", "200", "--synthetic-interactions", "20000"]);
    Setup { vhost: Vhost::new(), db, store: tempfile::tempdir().unwrap(), logs: tempfile::tempdir().unwrap() }
}

fn retrain(event_id: &str, params: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": "content-based", "event_id": event_id, "params": params})).unwrap()
}

/// Tends `workers` until every id in `answered` is satisfied and `dead` dead letters arrived, or
/// fails after `limit`.
async fn tend_until(workers: &mut [Restarting], events: &Events, answered: &[String], dead: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        workers.iter_mut().for_each(Restarting::tend);
        let all = events.all();
        let done = satisfied(&all);
        if answered.iter().all(|id| done.contains(id)) && events.dead_letters().len() >= dead {
            return;
        }
        if Instant::now() >= deadline {
            let exits: Vec<String> = workers.iter().flat_map(|w| w.exits.iter().map(|(s, _)| s.to_string())).collect();
            panic!("not answered after {limit:?}; exits {exits:?}; recorded {all:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn answer_of<'a>(events: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    events
        .iter()
        .find(|e| e["satisfies"].as_array().is_some_and(|s| s.iter().any(|v| v == id)))
        .unwrap_or_else(|| panic!("no event answers {id}: {events:#?}"))
}

#[tokio::test]
async fn runs_too_large_for_the_address_space_limit_are_refused_and_the_request_behind_them_is_published() {
    let _serial = serial().await;
    let setup = setup().await;
    let events = Events::listen(&setup.vhost).await;
    let mut env = setup.env(&[]);
    // What the issue reproduced: 3 GiB of address space per worker, no WORKER_MEMORY_LIMIT (the
    // budget is read from the limit itself).
    env.wrapper = vec!["prlimit".into(), format!("--as={}", 3 * GIB), "--".into()];
    let mut workers = vec![Restarting::start(&env, "a"), Restarting::start(&env, "b")];
    for w in &mut workers {
        w.worker.wait_ready(MINUTE).await;
    }
    let publisher = Publisher::new(&setup.vhost).await;
    // 8 GiB of [B, B] buffers: can never run here, dead-lettered on arrival.
    publisher
        .raw("retrain.content-based", &retrain("never-fits", serde_json::json!({"batch_size": 32768})), "never-fits")
        .await;
    // 2.98 GiB of [B, B] buffers passes intake; with the activations and the process it does not fit.
    publisher
        .raw("retrain.content-based", &retrain("over-budget", serde_json::json!({"batch_size": 20000})), "over-budget")
        .await;
    let over = "over-budget".to_string();
    tend_until(&mut workers, &events, std::slice::from_ref(&over), 1, 3 * MINUTE).await;
    let ordinary = publisher.request("ordinary-after-poison").await;
    let started = Instant::now();
    tend_until(&mut workers, &events, std::slice::from_ref(&ordinary), 1, 3 * MINUTE).await;

    let dead = events.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].message_id.as_deref(), Some("never-fits"));
    assert_eq!(dead[0].headers["x-audotics-dead-letter-reason"], "invalid_params");
    let detail = &dead[0].headers["x-audotics-dead-letter-detail"];
    assert!(detail.contains("8.00 GiB") && detail.contains("3.00 GiB (rlimit_as)"), "{detail}");

    let failed = events.events("model-failed");
    let refusal = answer_of(&failed, "over-budget");
    assert_eq!(refusal["outcome"], "resource_limit", "{refusal:#}");
    assert_eq!(refusal["budget_bytes"], 3 * GIB);
    assert_eq!(refusal["budget_source"], "rlimit_as");
    let estimate = refusal["estimate_bytes"].as_u64().unwrap();
    assert!(estimate > 3 * GIB, "{refusal:#}");
    assert!(refusal["estimate"]["train_step_bytes"].as_u64().unwrap() >= 2 * 20000 * 20000 * 4, "{refusal:#}");

    let ready = events.events("model-ready");
    assert_eq!(answer_of(&ready, &ordinary)["model"], "content-based");
    let exits: Vec<_> = workers.iter().flat_map(|w| w.exits.iter()).collect();
    assert!(exits.is_empty(), "no worker may exit: {exits:#?}");
    assert_eq!(
        setup.db.count("SELECT count(*) FROM audotics_trainer.run_jobs WHERE state = 'failed' AND attempts = 1").await,
        1,
        "refused on its first attempt, not retried"
    );
    eprintln!(
        "figures: estimate {:.2} GiB vs budget 3 GiB; the ordinary request published {:.1} s after it was sent",
        estimate as f64 / GIB as f64,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn a_run_the_oom_killer_ends_on_every_attempt_is_failed_as_crashed_and_the_next_request_proceeds() {
    let _serial = serial().await;
    let setup = setup().await;
    let events = Events::listen(&setup.vhost).await;
    let cgroup = MemoryCgroup::new(GIB);
    // The budget is set above the cgroup's real limit (a misconfiguration, or memory the estimate
    // does not see): the run passes its check, and the kernel kills whichever worker trains it.
    let mut env = setup.env(&[("WORKER_MEMORY_LIMIT", "16GiB"), ("RUN_MAX_ATTEMPTS", "3")]);
    env.wrapper = cgroup.wrapper();
    let mut workers = vec![Restarting::start(&env, "a"), Restarting::start(&env, "b")];
    for w in &mut workers {
        w.worker.wait_ready(MINUTE).await;
    }
    let publisher = Publisher::new(&setup.vhost).await;
    let started = Instant::now();
    publisher
        .raw("retrain.content-based", &retrain("poison", serde_json::json!({"batch_size": 16384})), "poison")
        .await;
    // Sent once the poison run is claimed, the ordinary request waits behind it (not coalesced into it).
    eventually(MINUTE, "the poison run claimed", || async {
        (setup.db.count("SELECT count(*) FROM audotics_trainer.run_jobs").await == 1).then_some(())
    })
    .await;
    let ordinary = publisher.request("ordinary-behind-poison").await;
    let ids = ["poison".to_string(), ordinary.clone()];
    tend_until(&mut workers, &events, &ids, 0, 4 * MINUTE).await;
    let seconds = started.elapsed().as_secs_f64();

    let failed = events.events("model-failed");
    let crashed = answer_of(&failed, "poison");
    assert_eq!(crashed["outcome"], "crashed", "{crashed:#}");
    assert_eq!(crashed["crashes"], 3, "{crashed:#}");
    assert_eq!(crashed["attempts"], 3, "{crashed:#}");
    assert!(crashed["error"].as_str().unwrap().contains("vanished without releasing its lease"), "{crashed:#}");
    let ready = events.events("model-ready");
    assert_eq!(answer_of(&ready, &ordinary)["model"], "content-based");
    assert_ne!(answer_of(&ready, &ordinary)["run_id"], crashed["run_id"], "the next request got a run of its own");

    let exits: Vec<_> = workers.iter().flat_map(|w| w.exits.iter()).collect();
    assert_eq!(
        exits.len(),
        3,
        "one crash per attempt, then no more: {:#?}",
        exits.iter().map(|e| &e.0).collect::<Vec<_>>()
    );
    assert!(
        exits.iter().all(|(status, _)| std::os::unix::process::ExitStatusExt::signal(status) == Some(9)),
        "OOM-killed"
    );
    assert_eq!(cgroup.oom_kills(), 3);
    let takeover_logs: usize = workers
        .iter()
        .map(|w| w.worker.log_lines("this run's owners have vanished before: it may be what crashes them").len())
        .sum::<usize>()
        + exits.iter().map(|(_, log)| log.matches("this run's owners have vanished before").count()).sum::<usize>();
    assert!(takeover_logs >= 2, "the third and fourth owners say the run crashed others before");
    assert_eq!(
        setup.db.count("SELECT count(*) FROM audotics_trainer.run_jobs WHERE state = 'failed' AND takeovers = 3").await,
        1
    );
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs WHERE status = 'failed'").await, 1);
    eprintln!(
        "figures: poison failed as crashed after 3 OOM kills; both requests answered {seconds:.1} s after sending"
    );
}

#[tokio::test]
async fn a_run_past_run_max_seconds_is_stopped_failed_and_answered_and_its_checkpoints_deleted() {
    let _serial = serial().await;
    let (setup, events, _worker, publisher) =
        one_worker(&[("AUDOTICS_EPOCHS", "1000"), ("RUN_MAX_SECONDS", "4"), ("AUDOTICS_KEEP_CHECKPOINTS", "3")]).await;
    let started = Instant::now();
    let id = publisher.request("too-slow").await;
    // While it trains, checkpoints do not accumulate: at any instant there are the kept three, the
    // best epoch's (kept for publication when it is older) and at most one just written whose
    // older neighbours are about to be pruned.
    let store = setup.store.path().to_path_buf();
    eventually(MINUTE, "a few epochs checkpointed", || async {
        newest_checkpoint(&store).filter(|(epoch, _)| *epoch >= 6)
    })
    .await;
    let kept = checkpoint_files(&store);
    assert!(kept.len() <= 3 + 2, "six epochs or more, at most five files: {kept:?}");
    events.wait_satisfied(std::slice::from_ref(&id), 2 * MINUTE).await;
    let seconds = started.elapsed().as_secs_f64();
    let failed = events.events("model-failed");
    let answer = answer_of(&failed, &id);
    assert_eq!(answer["outcome"], "deadline", "{answer:#}");
    assert_eq!(answer["run_max_seconds"], 4);
    assert!(events.events("model-ready").is_empty());
    assert_eq!(setup.db.count("SELECT count(*) FROM audotics_trainer.training_runs WHERE status = 'failed'").await, 1);
    assert!(checkpoint_files(&store).is_empty(), "a failed run keeps no checkpoints: {:?}", checkpoint_files(&store));
    eprintln!("figures: RUN_MAX_SECONDS 4, answered model-failed/deadline {seconds:.1} s after the request");
}

fn checkpoint_files(store: &std::path::Path) -> Vec<std::path::PathBuf> {
    let runs = store.join("content-based/runs");
    std::fs::read_dir(runs)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|run| std::fs::read_dir(run.path().join("checkpoints")).into_iter().flatten().flatten())
        .map(|f| f.path())
        .collect()
}

#[tokio::test]
async fn sigterm_while_the_store_hangs_mid_checkpoint_exits_1_when_the_grace_period_ends() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let s3 = super::s3::S3Server::start();
    let mut env = setup.env(&[("AUDOTICS_EPOCHS", "400"), ("WORKER_GRACE_SECONDS", "2")]);
    use_s3(&mut env, &s3);
    let mut worker = env.spawn("w1");
    worker.wait_ready(MINUTE).await;
    Publisher::new(&setup.vhost).await.request("hung-store").await;
    eventually(MINUTE, "two epochs trained", || async {
        (worker.log_lines("epoch finished").len() >= 2).then_some(())
    })
    .await;
    // The store stops answering (no error, no close): the training thread's next checkpoint write
    // blocks inside a phase that cannot look at the stop flag.
    s3.signal("STOP");
    let signalled = Instant::now();
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(2 + 5)).await;
    s3.signal("CONT");
    let status =
        status.unwrap_or_else(|| panic!("still running 5 s after its 2 s grace period:\n{}", worker.log_text()));
    assert_eq!(status.code(), Some(1), "{}", worker.log_text());
    assert_eq!(worker.log_lines("grace period over before the run stopped; exiting").len(), 1);
    eprintln!("figures: grace 2 s, store hung: exit 1 after {:.2} s", signalled.elapsed().as_secs_f64());
}

#[tokio::test]
async fn a_database_that_stops_answering_mid_run_stops_the_run_within_a_lease_and_it_completes_after() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let pg_port = url::Url::parse(&setup.db.url).unwrap().port().unwrap_or(5432);
    let proxy = Proxy::start(pg_port).await;
    let mut env = setup.env(&[("AUDOTICS_EPOCHS", "300"), ("WORKER_LEASE_SECONDS", "6")]);
    env.database_url = via_port(&setup.db.url, proxy.port);
    let events = Events::listen(&setup.vhost).await;
    let (worker, id, _) = run_until_checkpoint(&setup, &env, "stalled-db", 2).await;
    // Packets dropped, not connections closed: every database call now waits for an answer that
    // never comes. The heartbeat must give up within one lease (6 s) and stop the run.
    proxy.stall();
    let stalled = Instant::now();
    let line = "cannot renew the lease for a whole lease length; stopping the run";
    // Within the lease of the last renewal (≤ 6 s from here), with 2 s for a busy machine.
    eventually(Duration::from_secs(6 + 2), "the run stopped inside its lease", || async {
        (!worker.log_lines(line).is_empty()).then_some(())
    })
    .await;
    let stopped_after = stalled.elapsed().as_secs_f64();
    proxy.unstall();
    events.wait_satisfied(std::slice::from_ref(&id), 3 * MINUTE).await;
    assert_eq!(events.events("model-ready").len(), 1);
    eprintln!(
        "figures: database stalled (no close); the run stopped {stopped_after:.1} s later (lease 6 s); published after"
    );
}

#[tokio::test]
async fn a_worker_whose_clock_is_a_day_ahead_cannot_hold_latest_back() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let events = Events::listen(&setup.vhost).await;
    let publisher = Publisher::new(&setup.vhost).await;
    // The clock check off, and a local store (no signatures): this worker trains, and what is
    // tested is that its clock names nothing.
    let mut ahead_env = setup.env(&[("WORKER_MAX_CLOCK_SKEW_SECONDS", "0")]);
    ahead_env.extra.extend(clock_offset("+1d"));
    let mut ahead = ahead_env.spawn("ahead");
    ahead.wait_ready(MINUTE).await;
    let first = publisher.request("from-tomorrow").await;
    events.wait_satisfied(std::slice::from_ref(&first), 2 * MINUTE).await;
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%d").to_string();
    let started = &ahead.log_lines("worker starting")[0]["timestamp"];
    assert!(started.as_str().unwrap().starts_with(&tomorrow), "the fault holds: its clock is a day ahead ({started})");
    drop(ahead);
    let mut normal = setup.env(&[]).spawn("normal");
    normal.wait_ready(MINUTE).await;
    let second = publisher.request("from-today").await;
    events.wait_satisfied(std::slice::from_ref(&second), 2 * MINUTE).await;

    let ready = events.events("model-ready");
    let (v1, v2) = (answer_of(&ready, &first), answer_of(&ready, &second));
    let (v1, v2, latest2) = (v1["version"].as_str().unwrap(), v2["version"].as_str().unwrap(), &v2["latest"]);
    assert!(v1 < v2, "versions are named by the database's clock, in claim order: {v1} then {v2}");
    let today = chrono::Utc::now().format("%Y%m%d").to_string();
    assert!(v1.starts_with(&today), "the day-ahead worker's version is named for today: {v1}");
    assert_eq!(latest2, true);
    let latest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(setup.store.path().join("content-based/latest.json")).unwrap()).unwrap();
    assert_eq!(latest["version"], v2, "latest.json names the newer version");
}

#[tokio::test]
async fn a_worker_whose_clock_is_a_day_ahead_claims_no_run_says_why_and_still_records_requests() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    let s3 = crate::s3::S3Server::start();
    let events = Events::listen(&setup.vhost).await;
    let publisher = Publisher::new(&setup.vhost).await;
    let mut ahead_env = setup.env(&[]);
    crate::use_s3(&mut ahead_env, &s3);
    let normal_env = ahead_env.clone();
    ahead_env.extra.extend(clock_offset("+1d"));
    let ahead = ahead_env.spawn("ahead");
    let (status, body) = eventually(MINUTE, "the day-ahead worker's first clock comparison", || async {
        ahead.readyz().await.filter(|(_, body)| !body["clock_skew_seconds"].is_null())
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["clock"], false, "{body}");
    let skew = body["clock_skew_seconds"].as_f64().unwrap();
    assert!((skew - 86_400.0).abs() < 60.0, "a day ahead: {skew} s");
    assert!(ahead.metrics().await.contains("audotics_clock_skew_exceeded 1"));
    assert_eq!(ahead.log_lines(CLOCK_OFF).len(), 1, "said once, with the figures: {}", ahead.log_text());

    // The only consumer is the day-ahead worker: it records the request (acked) but claims no run.
    let id = publisher.request("while-only-tomorrow-listens").await;
    let recorded = format!("SELECT count(*) FROM audotics_trainer.retrain_requests WHERE event_id = '{id}'");
    eventually(MINUTE, "the request recorded by the day-ahead worker", || async {
        (setup.db.count(&recorded).await == 1).then_some(())
    })
    .await;
    let mut normal = normal_env.spawn("normal");
    normal.wait_ready(MINUTE).await;
    events.wait_satisfied(std::slice::from_ref(&id), 2 * MINUTE).await;
    let ready = events.events("model-ready");
    assert_eq!(ready.len(), 1, "{ready:#?}");
    assert!(ahead.log_lines("run claimed").is_empty(), "{}", ahead.log_text());
    assert_eq!(normal.log_lines("run claimed").len(), 1);
    let failed = "SELECT count(*) FROM audotics_trainer.run_jobs WHERE attempts > 1";
    assert_eq!(setup.db.count(failed).await, 0, "no attempt was spent on the day-ahead worker");
    // Its clock is faked inside the worker itself, so SIGTERM reaches it: a clean exit.
    let mut ahead = ahead;
    ahead.signal("TERM");
    let status = ahead.wait_exit(MINUTE).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {}", ahead.log_text());
    eprintln!(
        "figures: skew measured {skew:.1} s (a day: 86400), not ready, no run claimed; published by the other worker"
    );
}

const CLOCK_OFF: &str = "this worker's clock is off the database's by more than WORKER_MAX_CLOCK_SKEW_SECONDS: it claims no \
                         run until it is corrected (S3 refuses requests signed at the wrong time); fix the host's time \
                         synchronisation (NTP)";
