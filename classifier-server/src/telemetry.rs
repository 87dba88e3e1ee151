//! The server's HTTP endpoint for operators (`--metrics-addr`, off by default):
//!
//! - `GET /metrics`: the [`ServerStats`] metrics in Prometheus' text format (requests,
//!   replies by outcome, errors by code, dead letters, batch-size and latency
//!   histograms, in-flight requests, resubscriptions, the model's name and version);
//! - `GET /healthz`: `200 ok` while the process runs (liveness);
//! - `GET /readyz`: `200 ready` when a model is loaded, the request subscription is open
//!   and the server is not draining; else `503` and the reason (readiness).
//!
//! It serves nothing else and reads nothing from requests.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::pipeline::ServerStats;

/// Content type of Prometheus' text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The endpoint's routes over `stats`.
pub fn router(stats: Arc<ServerStats>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(stats)
}

/// Binds `addr` (so that a taken port fails the start, clearly) and serves [`router`]
/// until `stop` is cancelled. Warns when the address is reachable from other machines.
pub async fn serve(
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener
        .local_addr()
        .context("reading the metrics address")?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "metrics and health are served beyond this machine");
    }
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, router(stats))
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the metrics endpoint failed");
        }
    });
    Ok((bound, task))
}

async fn metrics(State(stats): State<Arc<ServerStats>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        stats.render_prometheus(),
    )
}

async fn readyz(State(stats): State<Arc<ServerStats>>) -> impl IntoResponse {
    match stats.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One HTTP/1.1 GET over a plain socket: status code and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("a status line");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    #[tokio::test]
    async fn probes_and_metrics_answer_over_http() {
        let stats = Arc::new(ServerStats::default());
        let stop = CancellationToken::new();
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let (addr, task) = serve(any_port, Arc::clone(&stats), stop.clone())
            .await
            .expect("bind");
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: model not loaded\n".into())
        );
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/fashion-mnist");
        let classifier = crate::Classifier::load(std::path::Path::new(shipped)).expect("loads");
        stats.models_loaded(&crate::models::ModelSet::single(Arc::new(classifier)).served());
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("classifier_model_info{model=\"fashion-cnn\""));
        assert_eq!(
            get(addr, "/readyz").await,
            (
                503,
                "not ready: not subscribed to the request topic\n".into()
            )
        );
        assert_eq!(get(addr, "/nothing").await.0, 404);
        stop.cancel();
        task.await.expect("the server stops");
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = taken.local_addr().expect("addr");
        let stats = Arc::new(ServerStats::default());
        let error = serve(addr, stats, CancellationToken::new())
            .await
            .expect_err("the port is taken");
        assert!(format!("{error:#}").contains(&format!("cannot listen for metrics on {addr}")));
    }
}
