//! Storage conformance: the same checks against the local filesystem store and a real S3-compatible
//! server (s3s-fs, started per test on a free loopback port with its own data folder), plus the
//! S3-only failure cases.

mod conformance;
mod s3;
mod s3_failures;
