//! HTTP endpoints for operators and Prometheus: `/metrics`, `/healthz` (alive: no worker wedged)
//! and `/readyz` (every worker is consuming).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::worker::Health;

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds `addr` and serves until `cancel`; returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(alive))
        .route("/readyz", get(ready))
        .with_state(AppState { metrics, health });
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    Ok((bound, task))
}

async fn render(State(s): State<AppState>) -> String {
    s.metrics.render()
}

/// Alive unless a worker is wedged (then a restart is what helps; systemd's watchdog does it,
/// elsewhere the orchestrator's liveness probe).
async fn alive(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.wedged_now() {
        0 => (StatusCode::OK, "ok\n".into()),
        n => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("wedged: {n} worker(s) stuck for longer than watchdog.wedged_after; restart the process (see the log)\n"),
        ),
    }
}

async fn ready(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if crate::metrics::failing_spools() > 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: a spool cannot be written (disk full or permissions; see the log); nothing is consumed until it can\n",
        )
    } else if s.health.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: a worker is not consuming\n",
        )
    }
}
