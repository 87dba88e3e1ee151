//! The server's HTTP endpoint for operators (`--metrics-addr`, off by default):
//!
//! - `GET /metrics`: the [`ServerStats`] metrics in Prometheus' text format (requests,
//!   replies by outcome, errors by code, dead letters, batch-size and latency
//!   histograms, in-flight requests, resubscriptions, the model's name and version);
//!   behind a bearer token when `server.metrics_token_sha256` names any (the probes
//!   below stay open: an orchestrator's probes carry no token);
//! - `GET /healthz`: `200 ok` while the process runs (liveness);
//! - `GET /readyz`: `200 ready` when a model is loaded, the request subscription is open
//!   and the server is not draining; else `503` and the reason (readiness).
//!
//! What it shows comes from a [`MetricsSource`]: a server's [`ServerStats`], or the
//! backlog exporter's gauges ([`crate::backlog::exporter`]).
//!
//! It serves nothing else and reads nothing from requests. Its port faces whoever can
//! reach it, so connections are bounded the way Envoy and nginx bound theirs
//! ([`ConnectionLimits`]): a request's headers must arrive within a few seconds, a
//! connection lives at most a minute, and at most a few hundred are open at once
//! (beyond that, new ones are closed at once), so neither slow headers nor idle
//! connections can use up the process's file descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::bearer::{BearerTokens, Refusal};
use crate::log_safe::LogLimiter;
use crate::pipeline::ServerStats;
use crate::warn_limited;

/// Content type of Prometheus' text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How the endpoint bounds its connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// A request's headers must be in within this long (slow-header clients are cut).
    pub header_read_timeout: Duration,
    /// A connection is closed after this long, idle or not (scrapes take milliseconds).
    pub max_lifetime: Duration,
    /// Connections open at once, at most; new ones beyond are closed at once.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(5),
            max_lifetime: Duration::from_secs(60),
            max_connections: 256,
        }
    }
}

/// Pause after a failed accept (e.g. out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

static ACCEPT_LOG: LogLimiter = LogLimiter::new(1, Duration::from_secs(10));

/// What the endpoint shows: the process's metrics and its readiness. A model server's
/// [`ServerStats`] is one, the backlog exporter's gauges another, so both modes serve
/// the same endpoint.
pub trait MetricsSource: Send + Sync + 'static {
    /// Every metric in Prometheus' text exposition format, read now.
    fn metrics_text(&self) -> String;

    /// `Ok` when ready for work, else why not (what `/readyz` says after "not ready: ").
    fn ready(&self) -> Result<(), String>;
}

impl MetricsSource for ServerStats {
    fn metrics_text(&self) -> String {
        self.render_prometheus()
    }

    fn ready(&self) -> Result<(), String> {
        self.readiness().map_err(|why| why.to_string())
    }
}

/// What the routes share.
type Source = Arc<dyn MetricsSource>;

/// The endpoint's routes over `source`, `/metrics` only for callers that show one of
/// `metrics_tokens` (when any is configured).
pub fn router(source: Source, metrics_tokens: BearerTokens) -> Router {
    let tokens = Arc::new(metrics_tokens);
    let metrics = move |State(source): State<Source>, headers: HeaderMap| {
        let tokens = Arc::clone(&tokens);
        async move { metrics(&*source, &tokens, &headers) }
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(source)
}

/// Binds `addr` (so that a taken port fails the start, clearly) and serves [`router`]
/// with the default [`ConnectionLimits`] until `stop` is cancelled. Warns when the
/// address is reachable from other machines.
pub async fn serve(
    addr: SocketAddr,
    source: Source,
    metrics_tokens: BearerTokens,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    serve_with(
        addr,
        source,
        metrics_tokens,
        stop,
        ConnectionLimits::default(),
    )
    .await
}

/// [`serve`] with the given connection limits.
pub async fn serve_with(
    addr: SocketAddr,
    source: Source,
    metrics_tokens: BearerTokens,
    stop: CancellationToken,
    limits: ConnectionLimits,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener
        .local_addr()
        .context("reading the metrics address")?;
    if !bound.ip().is_loopback() && !metrics_tokens.required() {
        tracing::warn!(%bound, "metrics and health are served beyond this machine, without a token (server.metrics_token_sha256)");
    }
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    let router = router(source, metrics_tokens);
    Ok((bound, serve_router(listener, router, stop, limits)))
}

/// Serves `router` on `listener` with its connections bounded by `limits`, until `stop`
/// is cancelled: the server's endpoint and the HTTP gateway share it.
pub fn serve_router(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    limits: ConnectionLimits,
) -> JoinHandle<()> {
    tokio::spawn(accept_loop(listener, router, stop, limits))
}

/// Accepts connections until `stop`, each served on a task of its own under `limits`;
/// the open ones are closed when it ends.
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
    limits: ConnectionLimits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                warn_limited!(ACCEPT_LOG, %error, "accepting an HTTP connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Over the cap: the connection is dropped (closed) at once.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            warn_limited!(
                ACCEPT_LOG,
                max = limits.max_connections,
                "too many HTTP connections; closing new ones"
            );
            continue;
        };
        connections.spawn(serve_connection(stream, router.clone(), limits, slot));
    }
    connections.shutdown().await;
}

/// One HTTP/1.1 connection, cut after `limits.max_lifetime` or when its headers are slow.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: ConnectionLimits,
    _slot: OwnedSemaphorePermit,
) {
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    // Errors here are the peer's (a reset, a slow or malformed request): nothing to log.
    let _ = tokio::time::timeout(limits.max_lifetime, connection).await;
}

fn metrics(source: &dyn MetricsSource, tokens: &BearerTokens, headers: &HeaderMap) -> Response {
    match tokens.check(headers) {
        Ok(()) => (
            [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
            source.metrics_text(),
        )
            .into_response(),
        Err(refusal) => {
            let reason = match refusal {
                Refusal::Missing => "a token is required: send Authorization: Bearer <token>\n",
                Refusal::Invalid => "the token is not valid\n",
            };
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                reason,
            )
                .into_response()
        }
    }
}

/// How long [`probe`] waits for the whole answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of an answer [`probe`] reads (a `/metrics` page is tens of kilobytes).
const PROBE_MAX_BYTES: u64 = 4 << 20;

/// One `GET path` to this endpoint over a plain socket: the status code and the body.
///
/// It exists for `classifier-server healthcheck`, the container image's `HEALTHCHECK`
/// (the slim image has no HTTP client), and for the tests. An unspecified address
/// (`0.0.0.0`, `::`) is probed on loopback, where the server also listens.
pub async fn probe(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = loopback_if_unspecified(addr);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream
            .take(PROBE_MAX_BYTES)
            .read_to_end(&mut response)
            .await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .with_context(|| format!("no answer from {addr} within {PROBE_TIMEOUT:?}"))??;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("{addr} did not answer in HTTP"))?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// `0.0.0.0:p` → `127.0.0.1:p` and `[::]:p` → `[::1]:p`: a listener bound to every
/// interface is reached on loopback.
fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

async fn readyz(State(source): State<Source>) -> impl IntoResponse {
    match source.ready() {
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
        probe(addr, path).await.expect("an HTTP answer")
    }

    #[tokio::test]
    async fn probes_and_metrics_answer_over_http() {
        let stats = Arc::new(ServerStats::default());
        let stop = CancellationToken::new();
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let tokens = BearerTokens::default();
        let (addr, task) = serve(any_port, stats.clone(), tokens, stop.clone())
            .await
            .expect("bind");
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: model not loaded\n".into())
        );
        // How `classifier-server healthcheck` reaches a server bound to every interface.
        let every_interface = SocketAddr::from(([0, 0, 0, 0], addr.port()));
        assert_eq!(
            probe(every_interface, "/healthz").await.expect("answers").0,
            200
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
        let error = serve(
            addr,
            stats,
            BearerTokens::default(),
            CancellationToken::new(),
        )
        .await
        .expect_err("the port is taken");
        assert!(format!("{error:#}").contains(&format!("cannot listen for metrics on {addr}")));
    }

    /// With a token configured, `/metrics` answers only a caller that shows it; the
    /// probes stay open.
    #[tokio::test]
    async fn a_metrics_token_guards_metrics_and_not_the_probes() {
        use crate::bearer::hex_digest;
        let stats = Arc::new(ServerStats::default());
        let stop = CancellationToken::new();
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let tokens =
            BearerTokens::from_hex_digests("t", &[hex_digest("scrape-me")]).expect("digest");
        let (addr, task) = serve(any_port, stats, tokens, stop.clone())
            .await
            .expect("bind");
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("token is required"), "{body}");
        assert_eq!(
            get_with(addr, "/metrics", "Bearer wrong").await.0,
            401,
            "a wrong token"
        );
        let (status, body) = get_with(addr, "/metrics", "Bearer scrape-me").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("classifier_requests_received_total"),
            "{body}"
        );
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503, "open, and not ready");
        stop.cancel();
        task.await.expect("the server stops");
    }

    /// One GET with an `Authorization` header: status code and body.
    async fn get_with(addr: SocketAddr, path: &str, authorization: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }

    /// Whether the server closed `stream` within `within` (a read sees the end).
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buffer = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
                Err(_elapsed) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    async fn serve_limited(limits: ConnectionLimits) -> (SocketAddr, CancellationToken) {
        let stop = CancellationToken::new();
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let stats = Arc::new(ServerStats::default());
        let tokens = BearerTokens::default();
        let (addr, _task) = serve_with(any_port, stats, tokens, stop.clone(), limits)
            .await
            .expect("bind");
        (addr, stop)
    }

    #[tokio::test]
    async fn slow_headers_and_idle_connections_are_cut_and_probes_still_answer() {
        use tokio::io::AsyncWriteExt;
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            max_lifetime: Duration::from_secs(1),
            max_connections: 1_000,
        };
        let (addr, stop) = serve_limited(limits).await;
        // 500 clients that never finish their headers, and one that says nothing.
        let mut slow = Vec::new();
        for _ in 0..500 {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write");
            slow.push(stream);
        }
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        for stream in &mut slow {
            assert!(
                closed_within(stream, Duration::from_secs(5)).await,
                "a slow-header connection was not cut"
            );
        }
        assert!(
            closed_within(&mut idle, Duration::from_secs(5)).await,
            "an idle connection was not cut"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once() {
        let limits = ConnectionLimits {
            max_connections: 4,
            ..ConnectionLimits::default()
        };
        let (addr, stop) = serve_limited(limits).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut extra = TcpStream::connect(addr).await.expect("the kernel accepts");
        assert!(
            closed_within(&mut extra, Duration::from_secs(2)).await,
            "the fifth connection stayed open"
        );
        drop(held);
        // Slots come back once the held connections are gone.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let answered =
                tokio::time::timeout(Duration::from_secs(1), get(addr, "/healthz")).await;
            if let Ok((200, _)) = answered {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no slot came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
    }
}
