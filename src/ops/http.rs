//! `/healthz`, `/readyz` and `/metrics` on `http.listen`.
//!
//! - `/healthz`: the projector tasks are coming round their loops (liveness: a
//!   wedged daemon should be restarted).
//! - `/readyz`: the database answers and its schema is migrated (readiness).
//! - `/metrics`: Prometheus text format.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::Liveness;
use crate::db::Pool;
use crate::projector::Registry;

/// Database checks behind an endpoint give up after this long.
const DB_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub liveness: Arc<Liveness>,
    pub pool: Pool,
    pub registry: Registry,
    pub stall_after: Duration,
}

/// Binds `listen` and serves until `shutdown`. Binding errors are returned, so a
/// port that is taken stops the daemon at start-up with a clear message.
pub async fn serve(
    listen: &str,
    state: HttpState,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (http.listen): {e}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    Ok(tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }))
}

async fn healthz(State(state): State<HttpState>) -> Response {
    let stale = state.liveness.stale();
    if stale.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not making progress: {}\n", stale.join(", ")),
        )
            .into_response()
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let check = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        match crate::db::migrate::is_current(&client).await {
            Ok(true) => Ok(()),
            Ok(false) => Err("database schema is not migrated".to_string()),
            Err(e) => Err(format!("{e:#}")),
        }
    };
    match tokio::time::timeout(DB_TIMEOUT, check).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: database did not answer\n",
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    // The in-process metrics are served even when the database is down.
    let refresh = async {
        let client = state.pool.get().await.map_err(|e| anyhow::anyhow!(e))?;
        crate::status::collect(&client, &state.registry, state.stall_after).await
    };
    match tokio::time::timeout(DB_TIMEOUT, refresh).await {
        Ok(Ok(status)) => state.metrics.observe(&status),
        Ok(Err(e)) => {
            tracing::debug!(error = %format!("{e:#}"), "metrics: database gauges not refreshed")
        }
        Err(_) => tracing::debug!("metrics: database gauges not refreshed (timeout)"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
