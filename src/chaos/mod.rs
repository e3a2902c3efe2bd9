//! The fault suite's model of what happened and what must hold (issue 7). [`history`] is what the
//! workload and the nemesis record while they run, plus the final state read afterwards;
//! [`checker`] turns it into a verdict — lost, duplicated and unexpected outcomes, and every
//! invariant — and the report's figures.

pub mod checker;
pub mod history;
