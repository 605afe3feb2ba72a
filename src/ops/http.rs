//! `/healthz`, `/readyz`, `/metrics` and `/wait` on `http.listen`.
//!
//! - `/healthz`: the projector tasks are coming round their loops (liveness: a
//!   wedged daemon should be restarted).
//! - `/readyz`: the database answers and its schema is migrated, and every
//!   sink's broker is reachable (readiness).
//! - `/metrics`: Prometheus text format.
//! - `/wait`: `pgfold.wait_for` for clients not connected to PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::Liveness;
use crate::db::Pool;
use crate::projector::Registry;

/// Database checks behind an endpoint give up after this long.
const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// `/wait`: the timeout when `timeout_ms` is not given (as `pgfold.wait_for`'s
/// default), and the longest a client may ask for.
const WAIT_DEFAULT: Duration = Duration::from_secs(5);
const WAIT_MAX: Duration = Duration::from_secs(60);
/// `/wait` polls `pgfold.applied`, starting this soon and backing off to
/// `WAIT_POLL_MAX`.
const WAIT_POLL_FIRST: Duration = Duration::from_millis(1);
const WAIT_POLL_MAX: Duration = Duration::from_millis(10);

/// What the handlers share with the running daemon; cloned into each request.
#[derive(Clone)]
pub struct HttpState {
    /// The daemon's metrics: `/metrics` renders them after refreshing the
    /// database gauges.
    pub metrics: Arc<Metrics>,
    /// The projector tasks' heartbeats, which `/healthz` checks.
    pub liveness: Arc<Liveness>,
    /// The daemon's own pool, shared with the projector workers: each endpoint
    /// holds a connection only for one query.
    pub pool: Pool,
    /// The projectors whose lag `/metrics` reports.
    pub registry: Registry,
    /// How long a transaction may hold the horizon before `/metrics` reports it
    /// as stalling the feed (`daemon.stall_warn_after_ms`).
    pub stall_after: Duration,
}

/// Binds `listen` and serves until `shutdown`. Binding errors are returned, so a
/// port that is taken stops the daemon at start-up with a clear message.
pub async fn serve(
    listen: &str,
    state: HttpState,
    shutdown: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (http.listen): {e}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving /healthz, /readyz, /metrics and /wait");
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/wait", get(wait))
        .with_state(state);
    Ok(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    })
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
        Ok(Ok(())) => match state.registry.iter().find_map(|p| p.unavailable()) {
            None => (StatusCode::OK, "ready\n").into_response(),
            // A sink's broker.
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            )
                .into_response(),
        },
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
        let mut client = state.pool.get().await.map_err(|e| anyhow::anyhow!(e))?;
        // Every scrape runs the same lag statements on a pooled connection:
        // planned for their values, or a plan kept from a near-empty log would
        // scan the whole of it on every scrape (see `feed::plan_mode`).
        let tx = client.transaction().await?;
        crate::feed::set_plan_mode(&tx, false).await?;
        crate::status::collect(&tx, &state.registry, state.stall_after, None).await
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

/// `/wait`'s query string, checked by hand so that each problem gets its own line.
#[derive(Debug, serde::Deserialize)]
struct WaitQuery {
    projector: Option<String>,
    stream_id: Option<String>,
    sequence: Option<String>,
    timeout_ms: Option<String>,
}

struct WaitRequest {
    projector: String,
    stream_id: String,
    sequence: i64,
    timeout: Duration,
}

impl WaitQuery {
    fn parse(self) -> Result<WaitRequest, String> {
        let projector = self.projector.ok_or("missing parameter projector")?;
        let stream_id = self.stream_id.ok_or("missing parameter stream_id")?;
        let sequence = self.sequence.ok_or("missing parameter sequence")?;
        let sequence = sequence
            .parse::<i64>()
            .map_err(|_| format!("sequence must be an integer, not {sequence:?}"))?;
        let timeout = match self.timeout_ms {
            None => WAIT_DEFAULT,
            Some(ms) => ms
                .parse::<u64>()
                .ok()
                .map(Duration::from_millis)
                .filter(|t| *t <= WAIT_MAX)
                .ok_or_else(|| {
                    format!(
                        "timeout_ms must be an integer from 0 to {}, not {ms:?}",
                        WAIT_MAX.as_millis()
                    )
                })?,
        };
        Ok(WaitRequest {
            projector,
            stream_id,
            sequence,
            timeout,
        })
    }
}

/// 200 `{"applied": true}` once the projector has applied the event, 408
/// `{"applied": false}` at the timeout, 400 for bad parameters, 404 for an unknown
/// projector. The pool is shared with the projector workers, so a connection is
/// checked out for one `pgfold.applied` at a time, never for the whole wait.
async fn wait(State(state): State<HttpState>, Query(query): Query<WaitQuery>) -> Response {
    let request = match query.parse() {
        Ok(r) => r,
        Err(problem) => return (StatusCode::BAD_REQUEST, format!("{problem}\n")).into_response(),
    };
    let deadline = tokio::time::Instant::now() + request.timeout;
    let mut pause = WAIT_POLL_FIRST;
    loop {
        let look = async {
            let client = state.pool.get().await.map_err(|e| Some(e.to_string()))?;
            client
                .query_one(
                    "SELECT pgfold.applied($1, $2, $3)",
                    &[&request.projector, &request.stream_id, &request.sequence],
                )
                .await
                .map(|row| row.get::<_, bool>(0))
                // pgfold.applied raises 22023 for an unknown projector and nothing else.
                .map_err(|e| {
                    (e.code() != Some(&SqlState::INVALID_PARAMETER_VALUE))
                        .then(|| crate::db::error_text(&e))
                })
        };
        match tokio::time::timeout(DB_TIMEOUT, look).await {
            Ok(Ok(true)) => return applied(StatusCode::OK, true),
            Ok(Ok(false)) => {}
            Ok(Err(None)) => {
                return (
                    StatusCode::NOT_FOUND,
                    format!("unknown projector {:?}\n", request.projector),
                )
                    .into_response()
            }
            Ok(Err(Some(e))) => {
                return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
            }
            Err(_) => {
                return (StatusCode::SERVICE_UNAVAILABLE, "database did not answer\n")
                    .into_response()
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return applied(StatusCode::REQUEST_TIMEOUT, false);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(WAIT_POLL_MAX);
    }
}

fn applied(status: StatusCode, applied: bool) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"applied\": {applied}}}\n"),
    )
        .into_response()
}
