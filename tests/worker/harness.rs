//! The worker test harness: a RabbitMQ vhost and a Postgres database of the test's own, real worker
//! processes, a listener that records every event the workers announce, and a TCP proxy that can
//! take the database away. Tests run one at a time ([`serial`]): one of them restarts the broker.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audotics_trainer::broker::{self, BrokerSettings};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::Notify;

pub use crate::pg::{BIN, TestDb};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Holds the suite's lock for the test's duration (a failed test releases it too).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

pub fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl is required for these tests");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A vhost of the test's own on the local RabbitMQ, deleted when dropped.
pub struct Vhost {
    pub name: String,
    pub url: String,
}

impl Vhost {
    pub fn new() -> Self {
        let name = format!("audotics-test-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let url = format!("amqp://guest:guest@127.0.0.1:5672/{name}");
        Self { name, url }
    }

    pub fn settings(&self) -> BrokerSettings {
        BrokerSettings {
            url: self.url.clone(),
            delivery_limit: 5,
            dead_letter_max_messages: 100_000,
            prefetch: 10,
            connection_name: "test".into(),
        }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.name]).output();
    }
}

/// Restarts the RabbitMQ application, down for `down` (every connection drops; durable queues and
/// persistent messages survive).
pub fn restart_broker(down: Duration) {
    rabbitmqctl(&["stop_app"]);
    std::thread::sleep(down);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
}

/// Publishes raw retrain bodies with confirms (as a platform service would).
pub struct Publisher {
    _connection: lapin::Connection,
    channel: lapin::Channel,
}

impl Publisher {
    pub async fn new(vhost: &Vhost) -> Self {
        let connection = broker::connect(&vhost.settings()).await.unwrap();
        // The platform provisions the queue of the model it sends to, as a worker serving it would:
        // requests published before the first worker starts then wait for it.
        broker::declare_topology(&connection, &vhost.settings(), &["content-based".to_string()]).await.unwrap();
        let channel = broker::confirm_channel(&connection).await.unwrap();
        Self { _connection: connection, channel }
    }

    pub async fn raw(&self, routing_key: &str, body: &[u8], message_id: &str) {
        let delivered =
            broker::publish_json(&self.channel, broker::EVENTS_EXCHANGE, routing_key, body, message_id, None)
                .await
                .unwrap();
        assert_eq!(delivered, broker::Delivered::Routed, "the retrain queue must exist");
    }

    /// A valid request with `event_id`; returns the id.
    pub async fn request(&self, event_id: &str) -> String {
        let body = serde_json::json!({"schema_version": 1, "model": "content-based", "event_id": event_id});
        self.raw("retrain.content-based", &serde_json::to_vec(&body).unwrap(), event_id).await;
        event_id.to_string()
    }
}

/// Every message the workers announce (and every dead letter), recorded from durable queues of the
/// test's own, so that nothing is missed while the broker restarts.
pub struct Events {
    seen: Arc<Mutex<Vec<Recorded>>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub routing_key: String,
    pub body: serde_json::Value,
    pub raw: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub message_id: Option<String>,
    /// When the listener received it (ms since the Unix epoch).
    pub received_ms: i64,
    pub dead: bool,
}

const EVENTS_QUEUE: &str = "test.events";

impl Events {
    pub async fn listen(vhost: &Vhost) -> Self {
        Self::listen_with(vhost, true).await
    }

    /// Records announced events but leaves the dead-letter queue alone.
    pub async fn listen_events_only(vhost: &Vhost) -> Self {
        Self::listen_with(vhost, false).await
    }

    async fn listen_with(vhost: &Vhost, with_dead: bool) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let changed = Arc::new(Notify::new());
        let (url, s2, c2) = (vhost.url.clone(), seen.clone(), changed.clone());
        let settings = vhost.settings();
        // Declare before returning, so that nothing published after this is unroutable.
        let connection = broker::connect(&settings).await.unwrap();
        declare(&connection, &settings).await;
        drop(connection);
        let task = tokio::spawn(async move {
            loop {
                let settings = BrokerSettings { url: url.clone(), ..settings.clone() };
                let _ = consume(&settings, &s2, &c2, with_dead).await;
                tokio::time::sleep(Duration::from_millis(200)).await; // reconnect after a broker restart
            }
        });
        Self { seen, changed, task }
    }

    pub fn all(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    pub fn events(&self, kind: &str) -> Vec<serde_json::Value> {
        self.all().into_iter().filter(|r| !r.dead && r.routing_key.starts_with(kind)).map(|r| r.body).collect()
    }

    /// Deletes the `audotics.events` exchange and declares it again with this recorder's bindings
    /// (only those: the workers' own binding of the retrain exchange is theirs to restore).
    pub async fn delete_events_exchange(&self, vhost: &Vhost) {
        use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
        let connection = broker::connect(&vhost.settings()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel.exchange_delete(broker::EVENTS_EXCHANGE.into(), ExchangeDeleteOptions::default()).await.unwrap();
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(
                broker::EVENTS_EXCHANGE.into(),
                lapin::ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .unwrap();
        bind_recorder(&channel).await;
        let _ = connection.close(200, "done".into()).await;
    }

    pub fn dead_letters(&self) -> Vec<Recorded> {
        self.all().into_iter().filter(|r| r.dead).collect()
    }

    /// Waits until `done` holds over everything recorded, or fails after `limit`.
    pub async fn wait_for(&self, limit: Duration, what: &str, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            let all = self.all();
            if done(&all) {
                return all;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out after {limit:?} waiting for {what}; recorded: {all:#?}");
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    /// Waits until every id in `ids` is in some model-ready/-rejected/-failed event's `satisfies`.
    pub async fn wait_satisfied(&self, ids: &[String], limit: Duration) -> Vec<Recorded> {
        self.wait_for(limit, &format!("{} requests to be satisfied", ids.len()), |all| {
            let answered = satisfied(all);
            ids.iter().all(|id| answered.contains(id))
        })
        .await
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every event id any announced event satisfies.
pub fn satisfied(all: &[Recorded]) -> std::collections::BTreeSet<String> {
    all.iter()
        .filter(|r| !r.dead)
        .flat_map(|r| r.body["satisfies"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

async fn declare(connection: &lapin::Connection, settings: &BrokerSettings) {
    broker::declare_topology(connection, settings, &[]).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare(EVENTS_QUEUE.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    bind_recorder(&channel).await;
}

async fn bind_recorder(channel: &lapin::Channel) {
    for key in ["model-ready.*", "model-rejected.*", "model-failed.*"] {
        channel
            .queue_bind(
                EVENTS_QUEUE.into(),
                broker::EVENTS_EXCHANGE.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
}

async fn consume(
    settings: &BrokerSettings,
    seen: &Mutex<Vec<Recorded>>,
    changed: &Notify,
    with_dead: bool,
) -> anyhow::Result<()> {
    let connection = lapin::Connection::connect(&settings.url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut events = channel
        .basic_consume(EVENTS_QUEUE.into(), "events".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let mut dead = match with_dead {
        true => Some(
            channel
                .basic_consume(
                    broker::DEAD_LETTER_QUEUE.into(),
                    "dead".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?,
        ),
        false => None,
    };
    loop {
        let next_dead = async {
            match dead.as_mut() {
                Some(d) => d.next().await,
                None => std::future::pending().await,
            }
        };
        let (delivery, is_dead) = tokio::select! {
            d = events.next() => (d, false),
            d = next_dead => (d, true),
        };
        let delivery = match delivery {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(()),
        };
        let headers = delivery
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .filter_map(|(k, v)| match v {
                        AMQPValue::LongString(s) => Some((k.to_string(), s.to_string())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        seen.lock().unwrap().push(Recorded {
            routing_key: delivery.routing_key.to_string(),
            body: serde_json::from_slice(&delivery.data).unwrap_or(serde_json::Value::Null),
            raw: delivery.data.clone(),
            headers,
            message_id: delivery.properties.message_id().as_ref().map(|m| m.to_string()),
            received_ms: chrono::Utc::now().timestamp_millis(),
            dead: is_dead,
        });
        delivery.ack(BasicAckOptions::default()).await?;
        changed.notify_waiters();
    }
}

/// A worker process; killed when dropped.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
    pub http: u16,
    pub name: String,
}

/// What every worker of a test shares.
#[derive(Clone)]
pub struct WorkerEnv {
    pub database_url: String,
    pub amqp_url: String,
    pub store: String,
    pub logs: PathBuf,
    pub extra: Vec<(String, String)>,
    /// A command the worker runs under (`prlimit --as=N --`, a cgroup's `sh -c … exec`); empty: none.
    pub wrapper: Vec<String>,
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Small, quick training: a run takes seconds.
pub const FAST_TRAINING: &[(&str, &str)] = &[
    ("AUDOTICS_BATCH_SIZE", "32"),
    ("AUDOTICS_EMBEDDING_SIZE", "16"),
    ("AUDOTICS_EPOCHS", "3"),
    ("WORKER_POLL_SECONDS", "1"),
    ("WORKER_LEASE_SECONDS", "6"),
    ("RUN_RETRY_SECONDS", "1"),
    // Every epoch asked for: tests that need a long run (to fault it mid-way) ask for hundreds of
    // epochs, which early stopping would cut short.
    ("AUDOTICS_PATIENCE", "0"),
    // Models trained for seconds test the machinery: the quality floors are recorded, not enforced
    // (`a_first_version_that_loses_to_popularity…` turns them on).
    ("AUDOTICS_QUALITY_FLOORS", "false"),
];

impl WorkerEnv {
    pub fn spawn(&self, name: &str) -> Worker {
        let http = free_port();
        let log = self.logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        cmd.arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.database_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("MODEL_STORE_URL", &self.store)
            .env("WORKER_ID", name)
            .env("WORKER_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .env("AUDOTICS_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in FAST_TRAINING {
            cmd.env(k, v);
        }
        for (k, v) in &self.extra {
            cmd.env(k, v);
        }
        Worker { child: cmd.spawn().unwrap(), log, http, name: name.to_string() }
    }
}

impl Worker {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines whose message is `message`.
    pub fn log_lines(&self, message: &str) -> Vec<serde_json::Value> {
        BufReader::new(std::fs::File::open(&self.log).unwrap())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .collect()
    }

    pub async fn readyz(&self) -> Option<(u16, serde_json::Value)> {
        http_get(self.http, "/readyz").await
    }

    pub async fn metrics(&self) -> String {
        http_get_text(self.http, "/metrics").await.map(|(_, t)| t).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, limit: Duration) {
        if !self.ready_within(limit).await {
            let how = match self.child.try_wait() {
                Ok(Some(status)) => format!("exited ({status}) before it was ready"),
                _ => format!("not ready after {limit:?}"),
            };
            panic!("worker {} {how}:\n{}", self.name, self.log_text());
        }
    }

    /// Whether `/readyz` answers 200 within `limit` (false as soon as the process has exited).
    pub async fn ready_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((200, _)) = self.readyz().await {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) || Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; `None` after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_get_text(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await.ok()?.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

async fn http_get(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
    let (status, body) = http_get_text(port, path).await?;
    Some((status, serde_json::from_str(body.trim()).ok()?))
}

/// The platform database with a small synthetic dataset (enough for the minimum sizes).
pub async fn seeded_db() -> TestDb {
    let db = TestDb::new().await;
    db.seed_synthetic(&["--synthetic-tracks", "1000", "--synthetic-users", "100", "--synthetic-interactions", "6000"]);
    db
}

/// Waits until `probe` returns `Some`, polling; fails after `limit` naming `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The newest checkpoint position of any run of `content-based` in a local store, if any.
pub fn newest_checkpoint(store: &Path) -> Option<(usize, usize)> {
    let runs = std::fs::read_dir(store.join("content-based/runs")).ok()?;
    runs.filter_map(Result::ok)
        .flat_map(|run| std::fs::read_dir(run.path().join("checkpoints")).into_iter().flatten().filter_map(Result::ok))
        .filter_map(|f| audotics_trainer::training::checkpoint::position_of(f.file_name().to_str()?))
        .max()
}

/// A TCP proxy in front of Postgres that can be cut (every connection dropped, new ones refused)
/// and restored on the same port: "the database is down" without touching the shared server.
pub struct Proxy {
    pub port: u16,
    up: Arc<tokio::sync::watch::Sender<bool>>,
    /// While set, nothing is forwarded either way and nothing is closed: a network that drops
    /// packets, not one that refuses them.
    stalled: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Proxy {
    pub async fn start(target: u16) -> Self {
        let first = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut first = Some(first);
        let (up, _) = tokio::sync::watch::channel(true);
        let up = Arc::new(up);
        let up2 = up.clone();
        let stalled = Arc::new(tokio::sync::watch::channel(false).0);
        let stalled2 = stalled.clone();
        tokio::spawn(async move {
            loop {
                let mut watch = up2.subscribe();
                if !*watch.borrow() {
                    let _ = watch.wait_for(|u| *u).await;
                }
                let listener = match first.take() {
                    Some(l) => l,
                    None => tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap(),
                };
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((mut client, _)) = accepted else { continue };
                            let mut cut = up2.subscribe();
                            let mut stall = stalled2.subscribe();
                            tokio::spawn(async move {
                                // A connection made while stalled waits, unanswered, for the end of it.
                                let _ = stall.wait_for(|s| !*s).await.is_ok();
                                let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                                let stalled = tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                                    _ = cut.wait_for(|u| !*u) => false,
                                    r = stall.wait_for(|s| *s) => r.is_ok(),
                                };
                                if stalled {
                                    // Hold both ends open, silent, until the stall ends; then drop them.
                                    let _ = stall.wait_for(|s| !*s).await.is_ok();
                                }
                            });
                        }
                        _ = watch.wait_for(|u| !*u) => break, // drop the listener: connections refused
                    }
                }
            }
        });
        Self { port, up, stalled }
    }

    /// Stops forwarding without closing anything (see `stalled`).
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Ends a stall: the held connections are closed, new ones forwarded again.
    pub fn unstall(&self) {
        self.stalled.send_replace(false);
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// `db.url` with the port replaced (to go through a [`Proxy`]).
pub fn via_port(url: &str, port: u16) -> String {
    let mut u = url::Url::parse(url).unwrap();
    u.set_port(Some(port)).unwrap();
    u.to_string()
}

/// A cgroup (v1 memory controller) of the test's own with a memory limit: a process in it that
/// touches more is killed by the kernel's OOM killer, as a pod over its limit is. Removed when
/// dropped.
pub struct MemoryCgroup {
    pub dir: PathBuf,
}

impl MemoryCgroup {
    pub fn new(limit_bytes: u64) -> Self {
        let dir =
            PathBuf::from("/sys/fs/cgroup/memory").join(format!("audotics-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("these tests need a writable cgroup v1 memory controller: {e}"));
        std::fs::write(dir.join("memory.limit_in_bytes"), limit_bytes.to_string()).unwrap();
        Self { dir }
    }

    /// A wrapper that moves the worker into this cgroup before it starts (no window outside it).
    pub fn wrapper(&self) -> Vec<String> {
        let procs = self.dir.join("cgroup.procs");
        vec!["sh".into(), "-c".into(), format!("echo $$ > {} && exec \"$@\"", procs.display()), "sh".into()]
    }

    /// How many times the kernel's OOM killer acted in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let control = std::fs::read_to_string(self.dir.join("memory.oom_control")).unwrap_or_default();
        control.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A worker restarted one second after each exit, as a Deployment restarts a pod's container.
pub struct Restarting {
    env: WorkerEnv,
    name: String,
    pub worker: Worker,
    /// Every exit so far, with its log.
    pub exits: Vec<(ExitStatus, String)>,
    restart_at: Option<Instant>,
}

impl Restarting {
    pub fn start(env: &WorkerEnv, name: &str) -> Self {
        let worker = env.spawn(&format!("{name}-0"));
        Self { env: env.clone(), name: name.to_string(), worker, exits: Vec::new(), restart_at: None }
    }

    /// Notices an exit and restarts the worker when its second is up.
    pub fn tend(&mut self) {
        if self.restart_at.is_none()
            && let Ok(Some(status)) = self.worker.child.try_wait()
        {
            self.exits.push((status, self.worker.log_text()));
            self.restart_at = Some(Instant::now() + Duration::from_secs(1));
        }
        if self.restart_at.is_some_and(|at| Instant::now() >= at) {
            self.restart_at = None;
            self.worker = self.env.spawn(&format!("{}-{}", self.name, self.exits.len()));
        }
    }
}

/// Settings that run a worker with its clock `offset` off (libfaketime's syntax: `+1d`, `-10m`),
/// preloaded into the worker itself. Debian's `faketime` command would wrap the worker in a parent
/// that does not pass SIGTERM on, so a graceful shutdown could not be tested through it.
pub fn clock_offset(offset: &str) -> Vec<(String, String)> {
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|dir| dir.path().join("faketime/libfaketimeMT.so.1"))
        .find(|lib| lib.exists())
        .expect("libfaketime is required for these tests (scripts/services.sh installs Debian's faketime)");
    [
        ("LD_PRELOAD", lib.to_string_lossy().into_owned()),
        ("FAKETIME", offset.to_string()),
        // Intervals (leases, timeouts) keep their length; only the wall clock is off.
        ("DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .to_vec()
}
