//! The nemesis: one fault at a time, drawn from a seeded random schedule, each healed before the
//! next (an outage lasts a drawn while, a paused worker is continued, a killed one restarted).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::history::MalformedSent;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Profile;
use super::cluster::Cluster;
use super::workload;
use crate::harness::rabbitmqctl;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Kill9,
    Sigterm,
    BrokerRestart,
    DatabaseOutage,
    S3Outage,
    PausePastLease,
    Malformed,
    DirtyRows,
    PoisonRequest,
    DatabaseStall,
    ClockAhead,
    EventsExchangeDeleted,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Kill9 => "kill -9",
            Kind::Sigterm => "SIGTERM",
            Kind::BrokerRestart => "broker restart",
            Kind::DatabaseOutage => "database outage",
            Kind::S3Outage => "S3 outage",
            Kind::PausePastLease => "pause past lease",
            Kind::Malformed => "malformed messages",
            Kind::DirtyRows => "dirty rows",
            Kind::PoisonRequest => "poison request",
            Kind::DatabaseStall => "database stall (packets dropped)",
            Kind::ClockAhead => "worker clock a day ahead",
            Kind::EventsExchangeDeleted => "events exchange deleted",
        }
    }
}

/// Relative frequencies: killing workers is the commonest fault in production.
const WEIGHTS: &[(Kind, u32)] = &[
    (Kind::Kill9, 3),
    (Kind::Sigterm, 2),
    (Kind::BrokerRestart, 2),
    (Kind::DatabaseOutage, 2),
    (Kind::S3Outage, 2),
    (Kind::PausePastLease, 2),
    (Kind::Malformed, 2),
    (Kind::DirtyRows, 1),
    (Kind::PoisonRequest, 1),
    (Kind::DatabaseStall, 2),
    (Kind::ClockAhead, 1),
    (Kind::EventsExchangeDeleted, 1),
];

/// The weights in force: all of them, or only the kinds `only` names (`CHAOS_ONLY`, by
/// [`Kind::name`]), to replay one kind of fault many times.
fn weights(only: &[String]) -> Vec<(Kind, u32)> {
    let chosen: Vec<(Kind, u32)> =
        WEIGHTS.iter().copied().filter(|(k, _)| only.is_empty() || only.iter().any(|o| o == k.name())).collect();
    let known: Vec<&str> = WEIGHTS.iter().map(|(k, _)| k.name()).collect();
    assert!(!chosen.is_empty(), "CHAOS_ONLY={only:?} names no fault; the faults are {known:?}");
    chosen
}

fn draw(rng: &mut ChaCha8Rng, weights: &[(Kind, u32)]) -> Kind {
    let total: u32 = weights.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for (kind, weight) in weights {
        if pick < *weight {
            return *kind;
        }
        pick -= weight;
    }
    unreachable!()
}

#[derive(Default)]
pub struct Injected {
    by_kind: BTreeMap<Kind, i64>,
    pub malformed: Vec<MalformedSent>,
}

impl Injected {
    pub fn injected(&self) -> i64 {
        self.by_kind.values().sum()
    }

    pub fn counts(&self) -> Vec<(String, i64)> {
        self.by_kind.iter().map(|(k, n)| (k.name().to_string(), *n)).collect()
    }
}

/// Injects faults until `deadline`; returns what it injected.
pub async fn run(cluster: &mut Cluster, profile: &Profile, deadline: Instant) -> Injected {
    let mut rng = ChaCha8Rng::seed_from_u64(profile.seed);
    let mut injected = Injected::default();
    let mut sequence = 0u64;
    let weights = weights(&profile.only);
    loop {
        let gap = Duration::from_secs_f64(profile.fault_gap * rng.random_range(0.5..1.5));
        tokio::time::sleep(gap).await;
        if Instant::now() >= deadline {
            return injected;
        }
        let kind = draw(&mut rng, &weights);
        sequence += 1;
        let started = Instant::now();
        let what = inject(cluster, profile, &mut rng, kind, sequence, &mut injected.malformed).await;
        println!("chaos: fault {sequence} {} ({what}) took {:.1} s", kind.name(), started.elapsed().as_secs_f64());
        *injected.by_kind.entry(kind).or_default() += 1;
    }
}

fn seconds(rng: &mut ChaCha8Rng, low: f64, high: f64) -> Duration {
    Duration::from_secs_f64(rng.random_range(low..high))
}

async fn inject(
    cluster: &mut Cluster,
    profile: &Profile,
    rng: &mut ChaCha8Rng,
    kind: Kind,
    sequence: u64,
    malformed: &mut Vec<MalformedSent>,
) -> String {
    let live = cluster.live();
    let target = live[rng.random_range(0..live.len())];
    let outage = seconds(rng, 2.0, profile.max_outage as f64);
    match kind {
        Kind::Kill9 => {
            let mut worker = cluster.slots[target].worker.take().unwrap();
            let _ = worker.child.kill();
            let _ = worker.child.wait();
            tokio::time::sleep(seconds(rng, 0.2, 3.0)).await;
            cluster.respawn(target);
            worker.name.clone()
        }
        Kind::Sigterm => cluster.sigterm_and_respawn(target).await,
        Kind::BrokerRestart => {
            let down = seconds(rng, 0.0, 4.0);
            tokio::task::block_in_place(|| rabbitmqctl(&["stop_app"]));
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| {
                rabbitmqctl(&["start_app"]);
                rabbitmqctl(&["await_startup"]);
            });
            format!("down {:.1} s", down.as_secs_f64())
        }
        // Connections refused, or (a stall) packets dropped with nothing closed.
        Kind::DatabaseOutage | Kind::DatabaseStall => {
            let stall = kind == Kind::DatabaseStall;
            if stall {
                cluster.proxy.stall()
            } else {
                cluster.proxy.cut()
            }
            tokio::time::sleep(outage).await;
            if stall {
                cluster.proxy.unstall()
            } else {
                cluster.proxy.restore()
            }
            format!("{:.1} s", outage.as_secs_f64())
        }
        Kind::S3Outage => {
            cluster.s3.stop();
            tokio::time::sleep(outage).await;
            tokio::task::block_in_place(|| cluster.s3.restart());
            format!("{:.1} s", outage.as_secs_f64())
        }
        Kind::PausePastLease => {
            let pause = Duration::from_secs(profile.lease_seconds) + seconds(rng, 1.0, 5.0);
            let worker = cluster.slots[target].worker.as_ref().unwrap();
            worker.signal("STOP");
            tokio::time::sleep(pause).await;
            worker.signal("CONT");
            format!("{} for {:.1} s", worker.name, pause.as_secs_f64())
        }
        Kind::Malformed => {
            let count = rng.random_range(1..=3);
            let sent = workload::send_malformed(&cluster.vhost, &profile.models, rng, sequence, count).await;
            let what = sent.iter().map(|m| m.expected_reason.clone()).collect::<Vec<_>>().join(", ");
            malformed.extend(sent);
            what
        }
        Kind::DirtyRows => workload::insert_dirty_rows(&cluster.db, sequence).await,
        Kind::PoisonRequest => {
            let sent = workload::send_poison(&cluster.vhost, &profile.models, sequence).await;
            let what = sent.message_id.clone();
            malformed.push(sent);
            what
        }
        Kind::ClockAhead => {
            // Replaced by a worker whose clock reads tomorrow; it stays until a later fault (or the
            // heal) ends it. It must claim no run (S3 would refuse it) and still record requests.
            let before = cluster.sigterm_and_respawn_with(target, crate::harness::clock_offset("+1d")).await;
            format!("{before} replaced by {}", cluster.slots[target].worker.as_ref().unwrap().name)
        }
        Kind::EventsExchangeDeleted => {
            // What an operator's mistake does: the exchange goes, with every binding to and from it.
            // The recorder (standing in for the model servers) binds its queue again at once; the
            // workers must restore their own binding and publishing channel.
            cluster.events.delete_events_exchange(&cluster.vhost).await;
            "audotics.events".to_string()
        }
    }
}
