//! SIGTERM / Ctrl-C handling shared by `train` and `worker`: the first signal asks for a graceful
//! stop, the second exits at once with status 130.

/// Spawns the handler on the current runtime; `on_first` runs once, on the first signal.
pub fn on_stop_signals(on_first: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        let mut on_first = Some(on_first);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            match on_first.take() {
                Some(f) => f(),
                None => {
                    tracing::warn!("second stop signal: exiting now");
                    std::process::exit(130);
                }
            }
        }
    });
}
