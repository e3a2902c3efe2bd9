//! The workload: a platform service publishing retrain requests (steady, plus bursts for one
//! model), and the nemesis' bad inputs — malformed and oversized messages, dirty platform rows.

use std::time::{Duration, Instant};

use super::history::{MalformedSent, SentRequest};
use audotics_trainer::broker::{self, BrokerSettings, Delivered};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;

use super::Profile;
use crate::harness::{TestDb, Vhost};
use crate::pg::{interaction_sql, track_sql};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A confirm-mode publisher that reconnects after the broker goes away.
struct Connection {
    settings: BrokerSettings,
    open: Option<(lapin::Connection, lapin::Channel)>,
}

impl Connection {
    /// Publishes until RabbitMQ confirms it (a platform service retries with the same event id;
    /// the worker recognises a repeat). Fails the suite when that takes longer than any fault.
    async fn publish(&mut self, routing_key: &str, body: &[u8], message_id: &str) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let error = match &self.open {
                None => match connect(&self.settings).await {
                    Ok(open) => {
                        self.open = Some(open);
                        continue;
                    }
                    Err(e) => e,
                },
                Some((_, channel)) => {
                    let attempt =
                        broker::publish_json(channel, broker::EVENTS_EXCHANGE, routing_key, body, message_id, None);
                    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                        Ok(Ok(Delivered::Routed)) => return,
                        // Returned under `mandatory` (the nemesis deleted the events exchange, and
                        // no worker has bound the retrain exchange to the new one yet): retried, as
                        // a platform service that publishes with `mandatory` would.
                        Ok(Ok(Delivered::Unroutable)) => {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                            continue;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "no confirm within 10 s".to_string(),
                    }
                }
            };
            self.open = None;
            assert!(Instant::now() < deadline, "cannot publish {message_id} for 3 minutes: {error}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn connect(settings: &BrokerSettings) -> Result<(lapin::Connection, lapin::Channel), String> {
    let connection = broker::connect(settings).await.map_err(|e| e.to_string())?;
    let channel = broker::confirm_channel(&connection).await.map_err(|e| e.to_string())?;
    Ok((connection, channel))
}

/// Publishes requests until `stop`; returns every request RabbitMQ confirmed. `sent_ms` is the
/// first attempt, so time spent waiting out a broker restart counts in the latency.
pub async fn publish(settings: BrokerSettings, profile: Profile, stop: watch::Receiver<bool>) -> Vec<SentRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(profile.seed ^ 0x5eed);
    let mut connection = Connection { settings, open: None };
    let mut sent = Vec::new();
    let started = Instant::now();
    let mut next_burst = Duration::from_secs(profile.burst_every);
    let tick = Duration::from_secs_f64(1.0 / profile.rate);
    let mut next = Instant::now();
    while !*stop.borrow() {
        let burst = started.elapsed() >= next_burst;
        let (model, count) = match burst {
            true => {
                next_burst += Duration::from_secs(profile.burst_every);
                (profile.models[rng.random_range(0..profile.models.len())].clone(), profile.burst)
            }
            false => (profile.models[rng.random_range(0..profile.models.len())].clone(), 1),
        };
        for _ in 0..count {
            let event_id = format!("req-{:06}", sent.len() + 1);
            let body = serde_json::json!({"schema_version": 1, "model": model, "event_id": event_id});
            let sent_ms = now_ms();
            connection.publish(&format!("retrain.{model}"), &serde_json::to_vec(&body).unwrap(), &event_id).await;
            sent.push(SentRequest { event_id, model: model.clone(), sent_ms });
        }
        next += tick;
        tokio::time::sleep_until(next.into()).await;
    }
    sent
}

/// Publishes `count` bad messages of randomly drawn kinds; returns them with the reason each
/// must be dead-lettered with.
pub async fn send_malformed(
    vhost: &Vhost,
    models: &[String],
    rng: &mut ChaCha8Rng,
    sequence: u64,
    count: usize,
) -> Vec<MalformedSent> {
    let mut connection = Connection { settings: vhost.settings(), open: None };
    let model = &models[0];
    let mut out = Vec::new();
    for n in 0..count {
        let (reason, body) = match rng.random_range(0..6) {
            0 => ("malformed_json", format!(r#"{{"model": "{model}", "#).into_bytes()),
            1 => ("unsupported_schema_version", format!(r#"{{"schema_version": 7, "model": "{model}"}}"#).into_bytes()),
            2 => ("unknown_model", br#"{"model": "collaborative"}"#.to_vec()),
            3 => {
                ("oversized", format!(r#"{{"model": "{model}", "reason": "{}"}}"#, "x".repeat(70 * 1024)).into_bytes())
            }
            4 => ("invalid_params", format!(r#"{{"model": "{model}", "params": {{"epochs": 0}}}}"#).into_bytes()),
            _ => ("invalid_field", format!(r#"{{"model": "{model}", "requested_at": "soon"}}"#).into_bytes()),
        };
        let message_id = format!("bad-{sequence}-{n}");
        connection.publish(&format!("retrain.{model}"), &body, &message_id).await;
        out.push(MalformedSent { message_id, expected_reason: reason.to_string() });
    }
    out
}

/// The request of issue 14: valid by the contract, but a batch whose `[B, B]` buffers alone (8 GiB)
/// exceed every worker's memory budget (the suite's `WORKER_MEMORY_LIMIT`); dead-lettered at intake
/// as `invalid_params`, where it once crash-looped every worker that took its run.
pub async fn send_poison(vhost: &Vhost, models: &[String], sequence: u64) -> MalformedSent {
    let mut connection = Connection { settings: vhost.settings(), open: None };
    let model = &models[sequence as usize % models.len()];
    let message_id = format!("poison-{sequence}");
    let body = format!(r#"{{"model": "{model}", "event_id": "{message_id}", "params": {{"batch_size": 32768}}}}"#);
    connection.publish(&format!("retrain.{model}"), body.as_bytes(), &message_id).await;
    MalformedSent { message_id, expected_reason: "invalid_params".to_string() }
}

/// Inserts rows the loader must skip or repair: a track with a NaN feature, one without features,
/// one with an impossible key, plays of them, and interactions of a type nobody knows.
pub async fn insert_dirty_rows(db: &TestDb, sequence: u64) -> String {
    let s = sequence;
    let user: String =
        sqlx::query_scalar(r#"SELECT id FROM "User" ORDER BY random() LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    let track: String =
        sqlx::query_scalar(r#"SELECT id FROM "Track" ORDER BY random() LIMIT 1"#).fetch_one(&db.pool).await.unwrap();
    // Distinct timestamps: (user, track, type, timestamp) is unique, at millisecond precision.
    let play = |track: &str, kind: &str, ms: u32| {
        interaction_sql(&user, track, kind, &format!("now() + {ms} * interval '1 ms'"))
    };
    let (nan, bare, bad_key) = (format!("dirty-{s}-nan"), format!("dirty-{s}-bare"), format!("dirty-{s}-key"));
    for sql in [
        track_sql(&nan, Some(("valence", "'NaN'"))),
        track_sql(&bare, Some(("none", ""))),
        track_sql(&bad_key, Some(("key", "14"))),
        play(&nan, "play", 0),
        play(&bare, "play", 0),
        play(&bad_key, "like", 0),
        play(&track, "share", 0),
        play(&track, "share", 1),
    ] {
        db.exec(&sql).await;
    }
    "3 bad tracks, 5 bad interactions".to_string()
}
