//! The system under test: worker processes (each slot restarted under a new name after it dies),
//! Postgres behind a proxy that can cut it, an S3 server that can be stopped, and the broker.

use std::path::PathBuf;
use std::time::Duration;

use super::Profile;
use crate::harness::*;
use crate::s3::{self, S3Server};

pub struct Slot {
    pub base: String,
    pub generation: u32,
    /// `None` between a kill and the restart.
    pub worker: Option<Worker>,
    /// The worker runs with its clock a day ahead (until a later fault, or the heal, replaces it).
    pub clock_ahead: bool,
}

pub struct Cluster {
    pub vhost: Vhost,
    pub db: TestDb,
    pub events: Events,
    pub s3: S3Server,
    pub proxy: Proxy,
    pub env: WorkerEnv,
    pub slots: Vec<Slot>,
    pub unclean_shutdowns: Vec<String>,
    pub grace: Duration,
    logs: Option<tempfile::TempDir>,
}

impl Cluster {
    pub async fn start(profile: &Profile) -> Self {
        let vhost = Vhost::new();
        let db = seeded_db().await;
        let events = Events::listen(&vhost).await;
        let s3 = S3Server::start();
        let proxy = Proxy::start(url::Url::parse(&db.url).unwrap().port().unwrap_or(5432)).await;
        let logs = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(20);
        let extra = [
            ("WORKER_MODELS", profile.models.join(",")),
            ("WORKER_LEASE_SECONDS", profile.lease_seconds.to_string()),
            ("WORKER_GRACE_SECONDS", grace.as_secs().to_string()),
            // Production tolerates ~90 s of a failing dependency before a run fails for good
            // (30 s, then 60 s); this is the same shape, scaled to the suite's outages.
            ("RUN_RETRY_SECONDS", "2".to_string()),
            ("RUN_MAX_ATTEMPTS", "6".to_string()),
            // Every published version stays, so that the checker can verify each one.
            ("AUDOTICS_KEEP_VERSIONS", "100000".to_string()),
            ("MODEL_STORE_URL", "s3://models/chaos".to_string()),
            ("AWS_ENDPOINT", s3.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY.to_string()),
            // A pod's memory limit: the poison request's batch alone exceeds it.
            ("WORKER_MEMORY_LIMIT", "3GiB".to_string()),
        ];
        let env = WorkerEnv {
            database_url: via_port(&db.url, proxy.port),
            amqp_url: vhost.url.clone(),
            store: "s3://models/chaos".to_string(),
            logs: logs.path().to_path_buf(),
            extra: extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            wrapper: Vec::new(),
        };
        let mut cluster = Self {
            vhost,
            db,
            events,
            s3,
            proxy,
            env,
            slots: Vec::new(),
            unclean_shutdowns: Vec::new(),
            grace,
            logs: Some(logs),
        };
        for i in 1..=profile.workers {
            cluster.slots.push(Slot { base: format!("w{i}"), generation: 0, worker: None, clock_ahead: false });
            cluster.respawn(i - 1);
        }
        for slot in &mut cluster.slots {
            slot.worker.as_mut().unwrap().wait_ready(Duration::from_secs(60)).await;
        }
        cluster
    }

    /// Starts slot `i` again, under the next generation's name.
    pub fn respawn(&mut self, i: usize) {
        self.respawn_with(i, Vec::new());
    }

    /// Starts slot `i` again with `extra` settings (e.g. [`clock_offset`]'s).
    pub fn respawn_with(&mut self, i: usize, extra: Vec<(String, String)>) {
        let slot = &mut self.slots[i];
        slot.generation += 1;
        slot.clock_ahead = !extra.is_empty();
        let name = format!("{}-g{}", slot.base, slot.generation);
        let mut env = self.env.clone();
        env.extra.extend(extra);
        slot.worker = Some(env.spawn(&name));
    }

    /// Indices of slots with a running worker.
    pub fn live(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].worker.is_some()).collect()
    }

    /// Everything back up: the database reachable, the S3 server running, every slot with a live
    /// worker. (The nemesis restarts the broker within its own fault, checking rabbitmqctl's exit.)
    pub async fn heal(&mut self) {
        self.proxy.restore();
        self.proxy.unstall();
        if !self.s3.running() {
            tokio::task::block_in_place(|| self.s3.restart());
        }
        for i in 0..self.slots.len() {
            let exited = match self.slots[i].worker.as_mut() {
                Some(w) => matches!(w.child.try_wait(), Ok(Some(_))),
                None => true,
            };
            if exited {
                if let Some(w) = &self.slots[i].worker {
                    self.unclean_shutdowns.push(format!("{} exited on its own:\n{}", w.name, tail(&w.log_text())));
                }
                self.respawn(i);
            } else if self.slots[i].clock_ahead {
                // The clock is corrected: as a pod is, by a restart on a host whose time is right.
                self.sigterm_and_respawn(i).await;
            }
        }
    }

    /// SIGTERM slot `i`'s worker (it must exit 0 within its grace period) and start another.
    pub async fn sigterm_and_respawn(&mut self, i: usize) -> String {
        self.sigterm_and_respawn_with(i, Vec::new()).await
    }

    /// As [`Self::sigterm_and_respawn`], the new worker with `extra` settings.
    pub async fn sigterm_and_respawn_with(&mut self, i: usize, extra: Vec<(String, String)>) -> String {
        let mut worker = self.slots[i].worker.take().unwrap();
        worker.signal("TERM");
        match worker.wait_exit(self.grace + Duration::from_secs(5)).await {
            Some(status) if status.success() => {}
            other => self.unclean_shutdowns.push(format!(
                "{}: {other:?} after SIGTERM (grace {:?}):\n{}",
                worker.name,
                self.grace,
                tail(&worker.log_text())
            )),
        }
        self.respawn_with(i, extra);
        worker.name.clone()
    }

    /// Each live worker, and whether `/readyz` answered 200 within a minute.
    pub async fn readiness(&mut self) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        for worker in self.slots.iter_mut().filter_map(|slot| slot.worker.as_mut()) {
            let ready = worker.ready_within(Duration::from_secs(60)).await;
            out.push((worker.name.clone(), ready));
        }
        out
    }

    /// Keeps the worker logs after the run (for a failed run) and returns their folder.
    pub fn keep_logs(&mut self) -> Option<PathBuf> {
        self.logs.take().map(|d| d.keep())
    }
}

/// The last lines of a log, for a message.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
