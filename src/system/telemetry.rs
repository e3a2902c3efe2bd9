//! Logging: one subscriber for the whole process, JSON for machines or text for people, on stderr.
//! A progress bar (when stderr is a terminal) is hidden while a log line is written, so the two
//! never tear each other.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Json,
    Text,
}

/// The progress bar currently shown, if any. A global because the log writer, which the
/// subscriber owns, must reach it.
static ACTIVE_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// `info`, minus lapin's dump of every returned (unroutable) message — the worker logs those itself,
/// without the body — sqlx's notices about `IF NOT EXISTS` objects, and hnsw_rs's progress lines
/// (the neighbour table logs its own summary).
const DEFAULT_FILTER: &str = "info,lapin::returned_messages=error,sqlx::postgres::notice=warn,hnsw_rs=warn";

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` filter.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(ProgressAwareStderr);
    // try_init: tests and embedders may have installed one already.
    let _ = if json {
        builder.json().with_current_span(true).with_span_list(false).try_init()
    } else {
        builder.compact().try_init()
    };
}

#[derive(Clone, Copy)]
struct ProgressAwareStderr;

impl<'a> MakeWriter<'a> for ProgressAwareStderr {
    type Writer = ProgressAwareStderr;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

impl Write for ProgressAwareStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = ACTIVE_BAR.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf)).map(|_| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A per-epoch progress bar over pairs, shown only when stderr is a terminal. The bar is created at
/// the first epoch, so nothing is drawn before there is something to count.
pub struct EpochProgress {
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl EpochProgress {
    pub fn new(enabled: bool) -> Self {
        Self { enabled: enabled && std::io::stderr().is_terminal(), bar: None }
    }

    pub fn start_epoch(&mut self, epoch: usize, epochs: usize, pairs: usize) {
        if !self.enabled {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} pairs ({rate}, eta {eta})")
                .expect("valid template")
                .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} pairs/s", state.per_sec());
                })
                .progress_chars("=> ");
            let bar = ProgressBar::new(pairs as u64).with_style(style).with_message(format!("epoch {epoch}/{epochs}"));
            *ACTIVE_BAR.lock().unwrap_or_else(|p| p.into_inner()) = Some(bar.clone());
            bar
        });
        bar.reset();
        bar.set_length(pairs as u64);
        bar.set_message(format!("epoch {epoch}/{epochs}"));
    }

    pub fn advance(&self, pairs: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(pairs as u64);
        }
    }
}

impl Drop for EpochProgress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            *ACTIVE_BAR.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

/// `url` with any password replaced by `***`, for logs, errors and stored settings.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<unparseable URL>".to_string();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    // libpq and sqlx also take secrets as query parameters (`?password=`, `sslpassword=`, …).
    if parsed.query_pairs().any(|(k, _)| is_secret_parameter(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_parameter(&k) { "***".to_string() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

fn is_secret_parameter(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "passwd", "secret", "token", "credential"].iter().any(|s| name.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_passwords_even_with_special_characters() {
        assert_eq!(redact_url("postgres://app:s3cr%3At@db:5432/audotics"), "postgres://app:***@db:5432/audotics");
        assert_eq!(redact_url("postgres://postgres@127.0.0.1/test"), "postgres://postgres@127.0.0.1/test");
        assert_eq!(redact_url("not a url with secret"), "<unparseable URL>");
        assert_eq!(
            redact_url("postgres://app@db/audotics?sslmode=require&password=hunter2&sslpassword=k3y"),
            "postgres://app@db/audotics?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("amqp://u@h/%2f?auth_token=abc&heartbeat=10"),
            "amqp://u@h/%2f?auth_token=***&heartbeat=10"
        );
    }
}
