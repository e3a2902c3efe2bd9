//! Process-level facilities every stage may use; they know nothing of training or of the platform.
//!
//! - [`telemetry`]: logging (text or JSON) and the one error-field convention of its events;
//! - [`procstat`]: `/proc` readings (RSS, CPU seconds, address space);
//! - [`signals`]: SIGTERM / Ctrl-C handling;
//! - [`device`]: choosing where tensors live (CPU, or CUDA when compiled in and present).

pub mod cores;
pub mod device;
pub mod procstat;
pub mod signals;
pub mod telemetry;
