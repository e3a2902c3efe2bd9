//! The worker's coordination in Postgres: recording requests (dedup by `event_id`), claiming runs
//! under a lease (coalescing every pending request of a model into one run), heartbeats, and ending
//! runs together with their outbox events in one transaction.
//!
//! Files: [`requests`] (recording, and answering from a version), [`lease`] (claim, heartbeat,
//! release, retry), [`finish`] (ending a run; the newest version), [`outbox`] (the publisher's side).

pub mod finish;
pub mod lease;
pub mod outbox;
pub mod requests;

pub use finish::{Finish, NewestVersion, PublishedVersion, finish, newest_version};
pub use lease::{Claim, claim, heartbeat, release, retry_later};
pub use outbox::{OutboxEvent, mark_publish_failed, mark_published, next_outbox};
pub use requests::{
    EventDraft, Recorded, SATISFIES_PER_EVENT, TimerRefresh, record_request, record_timer_refresh, timer_refresh_id,
};
