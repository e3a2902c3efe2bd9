//! Requests are routed by model: pods serving different model sets share one broker without
//! dead-lettering each other's requests, the earlier releases' single queue is drained, and a
//! request for a model no worker serves is the only `unknown_model`. The dead-letter queue is
//! bounded, and a body over the broker's size limit never reaches a worker.

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use super::*;
use audotics_trainer::broker;

fn request(model: &str, event_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"model": model, "event_id": event_id})).unwrap()
}

/// What an earlier release left behind: the single quorum queue `audotics.retrain`, bound
/// `retrain.*`, holding one request of each model.
async fn legacy_queue_with(vhost: &Vhost, requests: &[(&str, &str)]) {
    use lapin::{ExchangeKind, options::ExchangeDeclareOptions};
    let connection = broker::connect(&vhost.settings()).await.unwrap();
    let channel = broker::confirm_channel(&connection).await.unwrap();
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    for (name, kind) in
        [(broker::EVENTS_EXCHANGE, ExchangeKind::Topic), (broker::DEAD_LETTER_EXCHANGE, ExchangeKind::Topic)]
    {
        channel.exchange_declare(name.into(), kind, durable, FieldTable::default()).await.unwrap();
    }
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(broker::DEAD_LETTER_EXCHANGE.into()));
    let queue = broker::LEGACY_RETRAIN_QUEUE;
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), args).await.unwrap();
    let bind = QueueBindOptions::default();
    channel
        .queue_bind(queue.into(), broker::EVENTS_EXCHANGE.into(), "retrain.*".into(), bind, FieldTable::default())
        .await
        .unwrap();
    for (model, id) in requests {
        let key = format!("retrain.{model}");
        let body = request(model, id);
        let sent = broker::publish_json(&channel, broker::EVENTS_EXCHANGE, &key, &body, id, None).await;
        assert_eq!(sent.unwrap(), broker::Delivered::Routed);
    }
}

#[tokio::test]
async fn pools_serving_different_models_answer_their_own_requests_and_only_an_unserved_model_is_dead_lettered() {
    let _serial = serial().await;
    let setup = Setup::new().await;
    legacy_queue_with(&setup.vhost, &[("content-based", "legacy-content"), ("other-model", "legacy-other")]).await;
    assert_eq!(
        queue_depth(&setup.vhost, broker::LEGACY_RETRAIN_QUEUE).await,
        2,
        "the premise: both wait on the old queue"
    );
    // Both pools' queues exist before either pool drains the old queue, as they do once each pool
    // has started once (the queues are durable). Without this the test raced: a pool that drained the
    // old queue before the other pool's first start re-routed that pool's request to no queue, and it
    // was dead-lettered `unknown_model` (README, "The earlier releases' single queue").
    let connection = broker::connect(&setup.vhost.settings()).await.unwrap();
    let models = ["content-based".to_string(), "other-model".to_string()];
    broker::declare_topology(&connection, &setup.vhost.settings(), &models).await.unwrap();
    let _ = connection.close(200, "pools' queues declared".into()).await;
    let events = Events::listen(&setup.vhost).await;
    let pool = |models: &str| setup.env(&[("QUALITY_TOLERANCE", "1.0"), ("WORKER_MODELS", models)]);
    let (mut content, mut other) = (pool("content-based").spawn("content"), pool("other-model").spawn("other"));
    content.wait_ready(MINUTE).await;
    other.wait_ready(MINUTE).await;
    let publisher = Publisher::new(&setup.vhost).await;
    for (model, id) in [("content-based", "new-content"), ("other-model", "new-other"), ("third-model", "unserved")] {
        publisher.raw(&format!("retrain.{model}"), &request(model, id), id).await;
    }
    let ids: Vec<String> =
        ["legacy-content", "legacy-other", "new-content", "new-other"].iter().map(|s| s.to_string()).collect();
    events.wait_satisfied(&ids, 3 * MINUTE).await;
    events.wait_for(MINUTE, "the unserved model's dead letter", |all| all.iter().any(|r| r.dead)).await;

    let dead = events.dead_letters();
    assert_eq!(dead.len(), 1, "only the unserved model is dead-lettered: {dead:#?}");
    assert_eq!(dead[0].routing_key, "retrain.third-model");
    assert_eq!(dead[0].headers["x-audotics-dead-letter-reason"], "unknown_model");
    assert!(dead[0].headers["x-audotics-dead-letter-detail"].contains("no worker serves it"), "{:?}", dead[0].headers);
    for event in events.events("model-ready") {
        let model = event["model"].as_str().unwrap();
        let answered: Vec<&str> = event["satisfies"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert!(answered.iter().all(|id| id.contains(if model == "other-model" { "other" } else { "content" })));
    }
    // Each pool trained only its own model.
    let trained = |w: &Worker, model: &str| {
        w.log_lines("run started").iter().any(|l| l.to_string().contains(&format!("\"model\":\"{model}\"")))
    };
    assert!(trained(&content, "content-based") && !trained(&content, "other-model"));
    assert!(trained(&other, "other-model") && !trained(&other, "content-based"));
    // The old queue was drained and no longer receives requests.
    assert_eq!(queue_depth(&setup.vhost, broker::LEGACY_RETRAIN_QUEUE).await, 0);
    publisher.request("after-drain").await;
    events.wait_satisfied(&["after-drain".to_string()], 2 * MINUTE).await;
    assert_eq!(queue_depth(&setup.vhost, broker::LEGACY_RETRAIN_QUEUE).await, 0, "the old queue is unbound");
    for w in [&mut content, &mut other] {
        w.signal("TERM");
        assert!(w.wait_exit(MINUTE).await.unwrap().success(), "{}", w.log_text());
    }
}

/// Sets the broker's `max_message_size` for the test (as docker-compose configures it), putting
/// back the value it had when dropped.
struct MaxMessageSize {
    before: String,
}

impl MaxMessageSize {
    fn set(bytes: u64) -> Self {
        let out = std::process::Command::new("rabbitmqctl")
            .args(["eval", "{ok, V} = application:get_env(rabbit, max_message_size), V."])
            .output()
            .expect("rabbitmqctl is required for these tests");
        let before = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(before.parse::<u64>().is_ok(), "max_message_size reads {before:?}");
        rabbitmqctl(&["eval", &format!("application:set_env(rabbit, max_message_size, {bytes}).")]);
        Self { before }
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        let set = format!("application:set_env(rabbit, max_message_size, {}).", self.before);
        let _ = std::process::Command::new("rabbitmqctl").args(["eval", &set]).output();
    }
}

#[tokio::test]
async fn the_dead_letter_queue_is_bounded_and_a_body_over_the_brokers_limit_never_reaches_a_worker() {
    let _serial = serial().await;
    let _limit = MaxMessageSize::set(1 << 20);
    let setup = Setup::new().await;
    // The worker declares the dead-letter queue first, with its bound of 3.
    let mut worker = setup.env(&[("DEAD_LETTER_MAX_MESSAGES", "3")]).spawn("w1");
    worker.wait_ready(MINUTE).await;
    let events = Events::listen_events_only(&setup.vhost).await;
    let publisher = Publisher::new(&setup.vhost).await;
    for i in 0..5 {
        publisher.raw("retrain.content-based", b"{\"model\": ", &format!("bad-{i}")).await;
    }
    eventually(MINUTE, "five dead letters", || async {
        worker.metrics().await.contains("audotics_dead_letters_total{reason=\"malformed_json\"} 5").then_some(())
    })
    .await;
    assert_eq!(queue_depth(&setup.vhost, broker::DEAD_LETTER_QUEUE).await, 3, "the oldest two were dropped");

    // 2 MiB: RabbitMQ refuses it at publish, before any worker buffers a byte of it.
    let huge = format!(r#"{{"model":"content-based","reason":"{}"}}"#, "x".repeat(2 << 20));
    let connection = broker::connect(&setup.vhost.settings()).await.unwrap();
    let channel = broker::confirm_channel(&connection).await.unwrap();
    let refused =
        broker::publish_json(&channel, broker::EVENTS_EXCHANGE, "retrain.content-based", huge.as_bytes(), "huge", None)
            .await;
    assert!(refused.is_err(), "the broker took a 2 MiB message: {refused:?}");
    let valid = publisher.request("valid-after-huge").await;
    events.wait_satisfied(std::slice::from_ref(&valid), 2 * MINUTE).await;
    let metrics = worker.metrics().await;
    assert!(!metrics.contains("reason=\"oversized\""), "the huge body reached the worker:\n{metrics}");
    assert!(worker.child.try_wait().unwrap().is_none(), "the worker exited:\n{}", worker.log_text());
}
