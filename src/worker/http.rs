//! `/healthz` (the process is alive), `/readyz` (broker, database and store reachable) and
//! `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tracing::warn;

use super::Shared;

/// Installs the process-wide Prometheus recorder.
pub(super) fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("seconds".to_string()),
            &[0.01, 0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0],
        )?
        .install_recorder()?;
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "audotics_retrain_requests_total",
        "Retrain requests by outcome (pending, duplicate, satisfied, dead_lettered)"
    );
    describe_counter!("audotics_dead_letters_total", "Requests dead-lettered by this worker, by reason");
    describe_counter!(
        "audotics_runs_total",
        "Runs by status (started, succeeded, rejected, failed, insufficient_data, retrying, released, lease_lost)"
    );
    describe_histogram!("audotics_run_duration_seconds", "Wall time of a run attempt, by status");
    describe_gauge!("audotics_epoch_loss", "Training loss of the newest epoch");
    describe_gauge!("audotics_pairs_per_second", "Training throughput of the newest epoch");
    describe_histogram!("audotics_publish_seconds", "Time to upload a version (artifacts, manifest, latest.json)");
    describe_gauge!("audotics_clock_skew_seconds", "This worker's clock minus the database's, at the last comparison");
    describe_gauge!(
        "audotics_clock_skew_exceeded",
        "1 while the clock skew exceeds WORKER_MAX_CLOCK_SKEW_SECONDS (no runs are claimed)"
    );
    describe_counter!("audotics_lease_takeovers_total", "Runs taken over from a worker whose lease expired");
    describe_counter!(
        "audotics_events_published_total",
        "Outbox events confirmed by RabbitMQ, by kind and whether a queue received them"
    );
    Ok(handle)
}

pub(super) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, metrics: PrometheusHandle) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error.message = %e, "health server stopped");
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, axum::Json<serde_json::Value>) {
    let broker = super::flag(&shared.broker_connected) && !shared.shutting_down();
    let database = tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&shared.pool))
        .await
        .is_ok_and(|r| r.is_ok());
    let probe = crate::publish::layout::latest(&shared.settings.models[0]);
    let store =
        tokio::time::timeout(Duration::from_secs(2), shared.store.exists(&probe)).await.is_ok_and(|r| r.is_ok());
    // The outbox's confirm channel: a connection can be up with its publishing channel closed.
    let publisher = shared.publish_channel.read().await.as_ref().is_some_and(|c| c.status().connected());
    // A clock too far off the database's: S3 would refuse this worker's runs (see `clock`).
    let clock = *shared.clock.lock().expect("clock lock");
    let ready = broker && publisher && database && store && clock.ok;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({
        "ready": ready, "broker": broker, "publisher": publisher, "database": database, "store": store,
        "clock": clock.ok, "clock_skew_seconds": clock.skew_seconds,
    });
    (status, axum::Json(body))
}
