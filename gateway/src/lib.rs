//! The HTTP gateway: the Open Inference Protocol (v2) in front of the classifier
//! servers. It speaks HTTP to its callers and the wire contract (`proto/README.md`) to
//! the servers, through whichever broker the config names, so servers scale out behind
//! it exactly as they do behind `client-app`.
//!
//! - [`dispatch`]: requests out, replies matched back, over the broker;
//! - [`catalog`]: what the servers' models are (learned by asking them);
//! - [`oip`]: the protocol's routes and bodies;
//! - [`jobs`]: uploads of many files, their results in a database, the report;
//! - [`auth`]: API keys (only their digests in the config), loopback-only without;
//! - [`mod@metrics`]: Prometheus metrics;
//! - [`error`]: every refusal as a status with a JSON body.
//!
//! With the embedded broker the servers cannot be elsewhere, so [`start`] runs one in
//! this process, as `client-app classify` does.

pub mod auth;
pub mod catalog;
pub mod dispatch;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod oip;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use classifier_app::{connect_with_retry, AppConfig, GatewayConfig};
use classifier_server::telemetry::{serve_router, ConnectionLimits};
use client_app::InProcessServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::ApiKeys;
use crate::catalog::Catalog;
use crate::dispatch::Dispatcher;
use crate::jobs::runner::JobRunner;
use crate::jobs::spool::Spool;
use crate::jobs::store::JobStore;
use crate::metrics::GatewayMetrics;

/// A connection lives at most this long (idle ones are closed sooner, by the read
/// timeout); long enough for any request, short enough that none is held forever.
const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(3600);

/// The limits one request is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body, in bytes.
    pub max_body_bytes: usize,
    /// Most images in one inference request.
    pub max_images: usize,
    /// Longest wait for the servers.
    pub request_timeout: Duration,
    /// Longest wait for a request's body.
    pub read_timeout: Duration,
}

/// What every handler shares.
#[derive(Clone)]
pub struct Shared {
    dispatcher: Arc<Dispatcher>,
    catalog: Arc<Catalog>,
    metrics: Arc<GatewayMetrics>,
    keys: Arc<ApiKeys>,
    limits: Limits,
    jobs: Arc<JobRunner>,
    job_limits: JobLimits,
}

/// Whether `headers` declare a body longer than `limit` (refused before reading it).
pub(crate) fn declares_more_than(headers: &axum::http::HeaderMap, limit: u64) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .is_some_and(|length| length > limit)
}

/// The limits on jobs' uploads.
#[derive(Debug, Clone, Copy)]
pub struct JobLimits {
    /// All bytes of one upload.
    pub max_job_bytes: u64,
    /// Files in one job.
    pub max_job_files: usize,
    /// What an archive may expand to.
    pub max_archive_expansion_bytes: u64,
    /// Longest an upload may take.
    pub upload_timeout: Duration,
}

/// Longest an upload of a job may take (large uploads over slow links).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(900);

/// A caller's string as echoed in an error: escaped and cut to 64 characters.
pub(crate) fn shown(text: &str) -> String {
    text.chars()
        .take(64)
        .flat_map(char::escape_default)
        .collect()
}

/// A running gateway.
pub struct Gateway {
    /// The address it serves on (the port chosen, if the config said 0).
    pub addr: SocketAddr,
    stop: CancellationToken,
    http: JoinHandle<()>,
    replies: JoinHandle<()>,
    in_process: Option<InProcessServer>,
}

impl Gateway {
    /// Waits until `stop` (given to [`start`]) is cancelled, then for the HTTP side and
    /// the reply reader to end (deleting the reply topic) and the in-process server.
    pub async fn wait(self) {
        self.stop.cancelled().await;
        if let Err(error) = self.http.await {
            tracing::warn!(%error, "the HTTP task failed");
        }
        if let Err(error) = self.replies.await {
            tracing::warn!(%error, "the reply reader failed");
        }
        if let Some(server) = self.in_process {
            server.stop().await;
        }
    }
}

/// Checks the settings, connects to the broker (starting an in-process server when the
/// broker lives in this process), and serves HTTP on `config.gateway.listen` until
/// `stop` is cancelled.
pub async fn start(config: &AppConfig, stop: CancellationToken) -> anyhow::Result<Gateway> {
    let settings = &config.gateway;
    let keys = ApiKeys::from_hex_digests(&settings.api_key_sha256)?;
    auth::check_exposure(settings.listen, &keys)?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;

    let broker = connect_with_retry(&config.broker, &stop).await?;
    let in_process = if broker.features().in_process_only {
        Some(InProcessServer::start(&broker, &config.server).await?)
    } else {
        None
    };
    let (dispatcher, replies) =
        Dispatcher::start(broker, &config.server, settings.max_pending, stop.clone()).await?;
    let request_timeout = Duration::from_secs(settings.request_timeout_secs);
    let runner = open_jobs(settings, &dispatcher, request_timeout, &stop).await?;
    let shared = Shared {
        dispatcher,
        catalog: Arc::new(Catalog::new(
            &settings.models,
            Duration::from_secs(settings.model_info_ttl_secs),
        )?),
        metrics: Arc::new(GatewayMetrics::new()?),
        keys: Arc::new(keys),
        limits: Limits {
            max_body_bytes: settings.max_body_bytes,
            // One request never needs more room than all callers together have.
            max_images: settings
                .max_images_per_request
                .clamp(1, settings.max_pending.max(1)),
            request_timeout,
            read_timeout: Duration::from_secs(settings.read_timeout_secs),
        },
        jobs: Arc::clone(&runner),
        job_limits: JobLimits {
            max_job_bytes: settings.max_job_bytes,
            max_job_files: settings.max_job_files.max(1),
            max_archive_expansion_bytes: settings.max_archive_expansion_bytes,
            upload_timeout: UPLOAD_TIMEOUT,
        },
    };
    let resumed = runner.resume_all().await?;
    if resumed > 0 {
        tracing::info!(jobs = resumed, "resumed the jobs left running");
    }
    let connection_limits = ConnectionLimits {
        header_read_timeout: shared.limits.read_timeout,
        max_lifetime: MAX_CONNECTION_LIFETIME,
        max_connections: settings.max_connections.max(1),
    };
    let http = serve_router(listener, router(shared), stop.clone(), connection_limits);
    tracing::info!(%addr, "serving the Open Inference Protocol");
    Ok(Gateway {
        addr,
        stop,
        http,
        replies,
        in_process,
    })
}

/// Opens the jobs database and spool (`data_dir`, or the per-user data directory).
async fn open_jobs(
    settings: &GatewayConfig,
    dispatcher: &Arc<Dispatcher>,
    request_timeout: Duration,
    stop: &CancellationToken,
) -> anyhow::Result<Arc<JobRunner>> {
    let data_dir = match &settings.data_dir {
        Some(dir) => dir.clone(),
        None => directories::ProjectDirs::from("", "", "image-classifier")
            .map(|dirs| dirs.data_dir().join("gateway"))
            .context("no home directory for the jobs' data: set gateway.data_dir")?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let url = match &settings.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", data_dir.join("jobs.db").display()),
    };
    let store = JobStore::open(&url).await?;
    let spool = Spool::open(&data_dir.join("spool"))?;
    tracing::info!(database = %jobs::store::redacted(&url), spool = %data_dir.join("spool").display(), "jobs stored");
    Ok(JobRunner::new(
        store,
        spool,
        Arc::clone(dispatcher),
        (settings.job_window, request_timeout),
        stop.clone(),
    ))
}

/// Every route: health open to all (probes carry no keys), the rest behind the keys;
/// every request counted by route and status.
pub fn router(shared: Shared) -> Router {
    let open = Router::new()
        .route("/v2/health/live", get(oip::live))
        .route("/v2/health/ready", get(oip::ready))
        .route("/", get(jobs::page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    let protected = Router::new()
        .route("/v2", get(oip::server_metadata))
        .route("/v2/models", get(oip::list_models))
        .route("/v2/repository/index", post(oip::repository_index))
        .route("/v2/models/{name}", get(oip::model_metadata))
        .route("/v2/models/{name}/ready", get(oip::model_ready))
        .route("/v2/models/{name}/infer", post(oip::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(oip::version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(oip::version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(oip::version_infer),
        )
        // Uploads are bounded by the jobs' own limits, checked as they stream in.
        .route(
            "/v1/jobs",
            get(jobs::list)
                .post(jobs::create)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/jobs/{id}", get(jobs::show).delete(jobs::delete))
        .route("/v1/jobs/{id}/results", get(jobs::results))
        .route("/v1/jobs/{id}/report", get(jobs::report))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_key));
    open.merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            count_request,
        ))
        .with_state(shared)
}

async fn readyz(State(shared): State<Shared>) -> Response {
    if shared.dispatcher.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the reply subscription is not open\n",
        )
            .into_response()
    }
}

async fn metrics(State(shared): State<Shared>) -> Response {
    let metrics = &shared.metrics;
    metrics.pending.set(shared.dispatcher.pending() as i64);
    metrics.catch_up_rejected_replies(shared.dispatcher.rejected_replies());
    match shared.jobs.store().count_by_state().await {
        Ok(counts) => {
            for (state, count) in counts {
                metrics.jobs.with_label_values(&[&state]).set(count);
            }
        }
        Err(error) => tracing::warn!("counting jobs for the metrics: {error:#}"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

async fn not_found() -> error::ApiError {
    error::ApiError::not_found("no such route; the Open Inference Protocol's are under /v2")
}

async fn require_key(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    match shared.keys.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

async fn count_request(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    shared.metrics.observe_request(
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
