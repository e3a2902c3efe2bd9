//! The invariants of a fault run, checked over its [`History`]. Each has a test that plants the
//! bug it exists to catch.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::history::{EventKind, History};

/// The checker's findings and the report's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Verdict {
    pub requests_sent: usize,
    pub requests_acked: usize,
    pub requests_satisfied: usize,
    /// Acked requests that no event's `satisfies` names.
    pub lost: Vec<String>,
    /// Requests RabbitMQ confirmed that the workers never recorded (after the final drain).
    pub unrecorded: Vec<String>,
    /// Requests named by two different events (answered twice).
    pub answered_twice: Vec<String>,
    /// Events received more than once with the same `event_id` (allowed: at least once; counted).
    pub duplicate_deliveries: usize,
    /// One announcement (kind, model, version or run) under more than one `event_id`.
    pub unstable_event_ids: Vec<String>,
    /// `satisfies` entries naming requests never sent.
    pub unexpected: Vec<String>,
    /// Pairs of runs of one model whose ledger intervals overlap.
    pub overlapping_runs: Vec<(String, String)>,
    pub damaged_versions: Vec<String>,
    /// `latest.json` samples that named a version whose manifest was missing.
    pub latest_without_manifest: Vec<String>,
    /// `latest.json` samples naming an older version than an earlier sample of the same model
    /// (versions sort by creation time; only an operator's rollback may move it back).
    pub latest_moved_back: Vec<String>,
    /// Malformed messages sent that were not dead-lettered with the expected reason.
    pub not_dead_lettered: Vec<String>,
    pub workers_not_ready: Vec<String>,
    pub orphaned_leases: Vec<String>,
    pub unclean_shutdowns: Vec<String>,
    /// Valid requests dead-lettered by RabbitMQ's delivery limit and replayed (not a violation:
    /// the dead-letter queue kept them; counted so that a rise is visible).
    pub replayed: usize,
    pub runs_started: usize,
    pub runs_resumed: usize,
    pub runs_completed: usize,
    pub runs_rejected: usize,
    pub runs_failed: usize,
    /// Most runs in progress at one moment (of different models: several keys train concurrently).
    pub peak_concurrent_runs: usize,
    pub faults: Vec<(String, i64)>,
    /// Request sent → first event that satisfies it.
    pub latency_p50_ms: Option<i64>,
    pub latency_p95_ms: Option<i64>,
}

/// Checks every invariant.
pub fn check(h: &History) -> Verdict {
    let sent: BTreeSet<&str> = h.sent.iter().map(|r| r.event_id.as_str()).collect();
    let acked: BTreeSet<&str> = h.acked.iter().map(String::as_str).collect();

    // Distinct events by id; a redelivered event counts once, and as a duplicate.
    let mut by_id: BTreeMap<&str, &super::history::ObservedEvent> = BTreeMap::new();
    let mut duplicate_deliveries = 0;
    let mut first_answer: BTreeMap<&str, i64> = BTreeMap::new();
    for e in &h.events {
        if by_id.insert(e.event_id.as_str(), e).is_some() {
            duplicate_deliveries += 1;
        }
        for id in &e.satisfies {
            let t = first_answer.entry(id.as_str()).or_insert(e.received_ms);
            *t = (*t).min(e.received_ms);
        }
    }
    let mut answered_by: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut ids_of: BTreeMap<(EventKind, &str, &str), BTreeSet<&str>> = BTreeMap::new();
    for (id, e) in &by_id {
        for r in &e.satisfies {
            answered_by.entry(r.as_str()).or_default().insert(id);
        }
        ids_of.entry((e.kind, e.model.as_str(), e.subject.as_str())).or_default().insert(id);
    }
    let satisfied: BTreeSet<&str> = answered_by.keys().copied().collect();

    let mut latencies: Vec<i64> =
        h.sent.iter().filter_map(|r| first_answer.get(r.event_id.as_str()).map(|t| t - r.sent_ms)).collect();
    latencies.sort_unstable();
    let percentile = |p: f64| -> Option<i64> {
        (!latencies.is_empty()).then(|| latencies[((latencies.len() - 1) as f64 * p).round() as usize])
    };

    let dead: BTreeSet<(&str, &str)> =
        h.dead_letters.iter().map(|d| (d.message_id.as_str(), d.reason.as_str())).collect();

    Verdict {
        requests_sent: sent.len(),
        requests_acked: acked.len(),
        requests_satisfied: satisfied.intersection(&sent).count(),
        lost: acked.iter().filter(|id| !satisfied.contains(*id)).map(|s| s.to_string()).collect(),
        unrecorded: sent.iter().filter(|id| !acked.contains(*id)).map(|s| s.to_string()).collect(),
        answered_twice: answered_by.iter().filter(|(_, ev)| ev.len() > 1).map(|(r, _)| r.to_string()).collect(),
        duplicate_deliveries,
        unstable_event_ids: ids_of
            .iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|((k, model, subject), ids)| format!("{k:?} {model} {subject}: {ids:?}"))
            .collect(),
        unexpected: satisfied.iter().filter(|id| !sent.contains(*id)).map(|s| s.to_string()).collect(),
        overlapping_runs: overlapping(h),
        damaged_versions: h
            .versions
            .iter()
            .filter_map(|v| v.problem.as_ref().map(|p| format!("{}/{}: {p}", v.model, v.version)))
            .collect(),
        latest_without_manifest: h
            .latest_samples
            .iter()
            .filter(|s| !s.manifest_present)
            .map(|s| format!("{}/{} at {}", s.model, s.version, s.at_ms))
            .collect(),
        latest_moved_back: moved_back(h),
        not_dead_lettered: h
            .malformed
            .iter()
            .filter(|m| !dead.contains(&(m.message_id.as_str(), m.expected_reason.as_str())))
            .map(|m| format!("{} (expected {})", m.message_id, m.expected_reason))
            .collect(),
        workers_not_ready: h.workers_ready.iter().filter(|(_, ready)| !ready).map(|(w, _)| w.clone()).collect(),
        orphaned_leases: h.orphaned_leases.clone(),
        unclean_shutdowns: h.unclean_shutdowns.clone(),
        replayed: h.replayed.len(),
        runs_started: h.runs.len(),
        runs_resumed: h.runs.iter().filter(|r| r.attempts > 1).count(),
        runs_completed: h.runs.iter().filter(|r| r.status == "succeeded").count(),
        runs_rejected: h.runs.iter().filter(|r| r.status == "rejected").count(),
        runs_failed: h.runs.iter().filter(|r| r.status == "failed").count(),
        peak_concurrent_runs: peak_concurrency(h),
        faults: h.faults.clone(),
        latency_p50_ms: percentile(0.5),
        latency_p95_ms: percentile(0.95),
    }
}

fn peak_concurrency(h: &History) -> usize {
    // Ends sort before starts at the same instant: [start, end) intervals that merely touch do not overlap.
    let mut edges: Vec<(i64, i64)> = Vec::new();
    for r in &h.runs {
        edges.push((r.started_ms, 1));
        edges.push((r.finished_ms.unwrap_or(i64::MAX), -1));
    }
    edges.sort_unstable();
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, delta) in edges {
        now += delta;
        peak = peak.max(now);
    }
    peak as usize
}

fn moved_back(h: &History) -> Vec<String> {
    let mut samples: Vec<_> = h.latest_samples.iter().collect();
    samples.sort_by_key(|s| s.at_ms);
    let mut newest: BTreeMap<&str, &str> = BTreeMap::new();
    let mut found = Vec::new();
    for s in samples {
        let seen = newest.entry(s.model.as_str()).or_insert(s.version.as_str());
        if s.version.as_str() < *seen {
            found.push(format!("{}: {} after {} at {}", s.model, s.version, seen, s.at_ms));
        } else {
            *seen = s.version.as_str();
        }
    }
    found
}

/// Runs of one model whose `[started, finished)` intervals intersect (a run still going at the end
/// extends to infinity).
fn overlapping(h: &History) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (i, a) in h.runs.iter().enumerate() {
        for b in &h.runs[i + 1..] {
            let (a_end, b_end) = (a.finished_ms.unwrap_or(i64::MAX), b.finished_ms.unwrap_or(i64::MAX));
            if a.model == b.model && a.started_ms < b_end && b.started_ms < a_end {
                found.push((a.run_id.clone(), b.run_id.clone()));
            }
        }
    }
    found
}

impl Verdict {
    /// Every violated invariant, one line each; empty when the run passed.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut add = |name: &str, items: Vec<String>| {
            if !items.is_empty() {
                v.push(format!(
                    "{name}: {} ({})",
                    items.len(),
                    items.iter().take(5).cloned().collect::<Vec<_>>().join("; ")
                ));
            }
        };
        add("lost", self.lost.clone());
        add("unrecorded", self.unrecorded.clone());
        add("answered twice", self.answered_twice.clone());
        add("unstable event ids", self.unstable_event_ids.clone());
        add("unexpected", self.unexpected.clone());
        add("overlapping runs", self.overlapping_runs.iter().map(|(a, b)| format!("{a} & {b}")).collect());
        add("damaged versions", self.damaged_versions.clone());
        add("latest.json without a manifest", self.latest_without_manifest.clone());
        add("latest.json moved back", self.latest_moved_back.clone());
        add("not dead-lettered", self.not_dead_lettered.clone());
        add("workers not ready", self.workers_not_ready.clone());
        add("orphaned leases", self.orphaned_leases.clone());
        add("unclean shutdowns", self.unclean_shutdowns.clone());
        v
    }

    pub fn ok(&self) -> bool {
        self.violations().is_empty()
    }

    /// The report printed at the end of a run.
    pub fn report(&self) -> String {
        let faults: i64 = self.faults.iter().map(|(_, n)| n).sum();
        let mut out = String::new();
        out.push_str(&format!(
            "requests: sent {}, acked {}, satisfied {}\n",
            self.requests_sent, self.requests_acked, self.requests_satisfied
        ));
        out.push_str(&format!(
            "runs: started {}, resumed {}, completed {}, rejected {}, failed {}; at most {} at once\n",
            self.runs_started,
            self.runs_resumed,
            self.runs_completed,
            self.runs_rejected,
            self.runs_failed,
            self.peak_concurrent_runs
        ));
        out.push_str(&format!("faults: {faults} ({})\n", fmt_counts(&self.faults)));
        out.push_str(&format!(
            "lost {} · duplicated {} · unexpected {}\n",
            self.lost.len() + self.unrecorded.len(),
            self.duplicate_deliveries,
            self.unexpected.len() + self.answered_twice.len()
        ));
        out.push_str(&format!("dead-lettered by the delivery limit and replayed: {}\n", self.replayed));
        let ms = |v: Option<i64>| v.map_or("-".to_string(), |v| format!("{:.1} s", v as f64 / 1000.0));
        out.push_str(&format!(
            "request → answer latency: p50 {}, p95 {}\n",
            ms(self.latency_p50_ms),
            ms(self.latency_p95_ms)
        ));
        match self.violations().as_slice() {
            [] => out.push_str("invariants: all hold\n"),
            v => {
                for line in v {
                    out.push_str(&format!("VIOLATED {line}\n"));
                }
            }
        }
        out
    }
}

fn fmt_counts(counts: &[(String, i64)]) -> String {
    counts.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::*;

    /// A clean history: three requests, two coalesced into one run, one answered by a later run;
    /// a malformed message dead-lettered; one event delivered twice (allowed).
    fn clean() -> History {
        let sent = |id: &str, t| SentRequest { event_id: id.into(), model: "m".into(), sent_ms: t };
        let ready = |id: &str, version: &str, satisfies: &[&str], t| ObservedEvent {
            kind: EventKind::ModelReady,
            event_id: id.into(),
            model: "m".into(),
            subject: version.into(),
            satisfies: satisfies.iter().map(|s| s.to_string()).collect(),
            received_ms: t,
        };
        let run = |id: &str, start, end| LedgerRun {
            run_id: id.into(),
            model: "m".into(),
            started_ms: start,
            finished_ms: Some(end),
            status: "succeeded".into(),
            attempts: 1,
        };
        History {
            sent: vec![sent("r1", 0), sent("r2", 10), sent("r3", 500)],
            acked: vec!["r1".into(), "r2".into(), "r3".into()],
            events: vec![
                ready("e1", "v1", &["r1", "r2"], 400),
                ready("e1", "v1", &["r1", "r2"], 450),
                ready("e2", "v2", &["r3"], 900),
            ],
            malformed: vec![MalformedSent { message_id: "bad".into(), expected_reason: "malformed_json".into() }],
            dead_letters: vec![DeadLetterSeen { message_id: "bad".into(), reason: "malformed_json".into() }],
            latest_samples: vec![LatestSample {
                model: "m".into(),
                version: "v1".into(),
                manifest_present: true,
                at_ms: 420,
            }],
            runs: vec![run("a", 20, 390), run("b", 600, 880)],
            versions: vec![
                VersionCheck { model: "m".into(), version: "v1".into(), problem: None },
                VersionCheck { model: "m".into(), version: "v2".into(), problem: None },
            ],
            workers_ready: vec![("w1".into(), true), ("w2".into(), true)],
            orphaned_leases: vec![],
            unclean_shutdowns: vec![],
            replayed: vec![],
            faults: vec![("kill -9".into(), 1)],
        }
    }

    fn violated(h: &History) -> Vec<String> {
        check(h).violations()
    }

    #[test]
    fn a_clean_history_passes_with_its_figures() {
        let v = check(&clean());
        assert!(v.ok(), "{:?}", v.violations());
        assert_eq!((v.requests_sent, v.requests_acked, v.requests_satisfied), (3, 3, 3));
        assert_eq!(v.duplicate_deliveries, 1);
        assert_eq!(v.latency_p50_ms, Some(400));
        assert_eq!(v.latency_p95_ms, Some(400));
        assert_eq!(v.runs_completed, 2);
        assert_eq!(v.peak_concurrent_runs, 1);
        assert!(v.report().contains("invariants: all hold"), "{}", v.report());
    }

    /// Each planted bug trips exactly its own invariant.
    fn only(h: History, invariant: &str) {
        let v = violated(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with(invariant), "{v:?}");
        assert!(check(&h).report().contains(&format!("VIOLATED {invariant}")));
    }

    #[test]
    fn a_lost_request_is_caught() {
        let mut h = clean();
        h.events.retain(|e| e.event_id != "e2");
        h.versions.pop();
        only(h, "lost");
    }

    #[test]
    fn a_confirmed_but_unrecorded_request_is_caught() {
        let mut h = clean();
        h.sent.push(SentRequest { event_id: "r4".into(), model: "m".into(), sent_ms: 950 });
        only(h, "unrecorded");
    }

    #[test]
    fn a_request_answered_by_two_events_is_caught() {
        let mut h = clean();
        h.events[2].satisfies.push("r1".into());
        only(h, "answered twice");
    }

    #[test]
    fn a_version_announced_under_two_event_ids_is_caught() {
        let mut h = clean();
        let mut again = h.events[0].clone();
        again.event_id = "e1-bis".into();
        again.satisfies = vec![];
        h.events.push(again);
        only(h, "unstable event ids");
    }

    #[test]
    fn an_answer_for_a_request_never_sent_is_caught() {
        let mut h = clean();
        h.events[2].satisfies.push("ghost".into());
        only(h, "unexpected");
    }

    #[test]
    fn overlapping_runs_are_caught_including_one_still_running() {
        let mut h = clean();
        h.runs[1].started_ms = 300;
        only(h.clone(), "overlapping runs");
        let mut h = clean();
        h.runs[0].finished_ms = None;
        only(h, "overlapping runs");
    }

    #[test]
    fn runs_of_different_models_may_overlap_and_count_as_concurrent() {
        let mut h = clean();
        h.runs[1].started_ms = 300;
        h.runs[1].model = "other".into();
        let v = check(&h);
        assert!(v.ok(), "{:?}", v.violations());
        assert_eq!(v.peak_concurrent_runs, 2);
    }

    #[test]
    fn a_damaged_version_is_caught() {
        let mut h = clean();
        h.versions[0].problem = Some("weights.safetensors does not match its sha256".into());
        only(h, "damaged versions");
    }

    #[test]
    fn latest_naming_a_version_without_manifest_is_caught() {
        let mut h = clean();
        h.latest_samples[0].manifest_present = false;
        only(h, "latest.json without a manifest");
    }

    #[test]
    fn latest_moving_back_to_an_older_version_is_caught() {
        let mut h = clean();
        let sample = |version: &str, at_ms| LatestSample {
            model: "m".into(),
            version: version.into(),
            manifest_present: true,
            at_ms,
        };
        h.latest_samples = vec![sample("v1", 420), sample("v2", 950), sample("v2", 960)];
        assert!(violated(&h).is_empty(), "moving forward is fine");
        h.latest_samples.push(sample("v1", 970));
        only(h, "latest.json moved back");
    }

    #[test]
    fn a_malformed_message_not_dead_lettered_or_with_another_reason_is_caught() {
        let mut h = clean();
        h.dead_letters.clear();
        only(h, "not dead-lettered");
        let mut h = clean();
        h.dead_letters[0].reason = "oversized".into();
        only(h, "not dead-lettered");
    }

    #[test]
    fn a_worker_not_ready_and_an_orphaned_lease_are_caught() {
        let mut h = clean();
        h.workers_ready[1].1 = false;
        only(h, "workers not ready");
        let mut h = clean();
        h.orphaned_leases.push("run-x".into());
        only(h, "orphaned leases");
    }

    #[test]
    fn a_worker_that_did_not_exit_cleanly_on_sigterm_is_caught() {
        let mut h = clean();
        h.unclean_shutdowns.push("w2: exit status 1".into());
        only(h, "unclean shutdowns");
    }
}
