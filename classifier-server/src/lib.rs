//! The model server: a long-running daemon that takes classify requests from a broker
//! topic, runs the CNN on batches of them and publishes the predictions to each
//! request's reply topic.
//!
//! The binary (`src/main.rs`) is a thin shell over this library so that `client-app`
//! can run the very same server inside its own process on the embedded broker.
//!
//! - [`config`]: the config file shared with the client;
//! - [`decode`]: untrusted bytes → image, with limits against decompression bombs;
//! - [`model_source`]: which model to load (named, per-user or built in);
//! - [`models`]: the models served, by name, reloaded when their directory changes;
//! - [`request`]: broker message → model input, predictions → reply message;
//! - [`pipeline`]: the server itself, one module per stage (intake, decode pool,
//!   batcher, model thread, reply, dead letters), and the stats they count into;
//! - [`log_safe`]: peers' strings escaped and cut before they are logged;
//! - [`telemetry`]: those stats as Prometheus metrics, and health probes, over HTTP.

pub mod config;
pub mod decode;
pub mod log_safe;
pub mod model_source;
pub mod models;
pub mod pipeline;
pub mod request;
pub mod telemetry;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use unified_broker::{retry_while_unavailable, Broker, BrokerConfig};

pub use classifier_inference::Classifier;
pub use config::{AppConfig, ClientConfig, NamedModel, ServerConfig};
pub use models::ModelSet;
pub use pipeline::{ModelServer, NotReady, ServerStats, StatsSnapshot};

/// Loads the model the config names, or else the per-user or built-in one (see
/// [`model_source`]), and logs which.
pub fn load_classifier(config: &ServerConfig) -> anyhow::Result<Arc<Classifier>> {
    let (source, classifier) = load_default_model(config)?;
    let meta = classifier.metadata();
    tracing::info!(model = %meta.name, version = %meta.version, engine = classifier.engine_name(), from = %source, "model loaded");
    log_onnx_engine(classifier.is_onnx());
    Ok(Arc::new(classifier))
}

/// The default model: the one the config names, or else the per-user or built-in one.
fn load_default_model(
    config: &ServerConfig,
) -> anyhow::Result<(model_source::ModelSource, Classifier)> {
    let source = model_source::resolve(
        config.model_dir.as_deref(),
        model_source::user_model_dir().as_deref(),
    )?;
    let classifier = model_source::load(&source)?;
    Ok((source, classifier))
}

/// Loads every model the config names (see [`ServerConfig::models`]): the default one
/// as [`load_classifier`] finds it unless only named models are given, then the named
/// ones. Models from a directory are reloaded when it changes.
pub fn load_models(config: &ServerConfig) -> anyhow::Result<ModelSet> {
    let mut models = Vec::new();
    if config.models.is_empty() || config.model_dir.is_some() {
        let (source, classifier) = load_default_model(config)?;
        let name = classifier.metadata().name.clone();
        models.push((
            name,
            source.dir().map(Path::to_path_buf),
            Arc::new(classifier),
        ));
    }
    for named in &config.models {
        let source = model_source::ModelSource::Configured(named.dir.clone());
        let classifier = model_source::load(&source)
            .with_context(|| format!("loading the model named {:?}", named.name))?;
        models.push((
            named.name.clone(),
            Some(named.dir.clone()),
            Arc::new(classifier),
        ));
    }
    let models = ModelSet::new(models)?;
    for (i, model) in models.served().iter().enumerate() {
        let meta = model.classifier.metadata();
        tracing::info!(model = %model.name, version = %meta.version, engine = model.classifier.engine_name(), default = (i == 0), "model loaded");
    }
    log_onnx_engine(models.served().iter().any(|m| m.classifier.is_onnx()));
    Ok(models)
}

/// Says which engine runs ONNX models and why (ONNX Runtime from where, or tract
/// because the library is not there) when any model served is ONNX: the first thing to
/// check when an ONNX model is slower than expected.
fn log_onnx_engine(any_onnx: bool) {
    if any_onnx {
        tracing::info!(
            engine = %classifier_inference::onnx::engine_report(),
            "ONNX engine"
        );
    }
}

/// Connects to the broker, retrying with backoff while it is unreachable, until it
/// answers or `shutdown` is cancelled. Logs what it waits for.
pub async fn connect_with_retry(
    config: &BrokerConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<dyn Broker>> {
    match retry_while_unavailable("a connection", shutdown.cancelled(), || {
        unified_broker::connect(config)
    })
    .await
    {
        Some(result) => result.context("connecting to the broker"),
        None => anyhow::bail!("stopped while waiting for the broker"),
    }
}

/// Locks `mutex`, carrying on with its data if a thread panicked while holding it (the
/// server's shared state stays usable: every update is a single assignment).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes SIGHUP harmless from now on (its default action ends the process): the server
/// takes it as "check the model directories", but only once it serves, and a
/// `systemctl reload` during start-up must not kill it. No-op off Unix.
pub fn catch_hangups() {
    // Tokio keeps a handler, once installed, for the life of the process.
    drop(Hangups::new());
}

/// SIGHUPs, as a stream that never ends where there are none (off Unix, or if the
/// handler cannot be installed, which is logged).
pub(crate) struct Hangups(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangups {
    pub(crate) fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal = signal(SignalKind::hangup())
                .inspect_err(
                    |error| tracing::warn!(%error, "cannot handle SIGHUP; it will stop the server"),
                )
                .ok();
            Hangups(signal)
        }
        #[cfg(not(unix))]
        Hangups()
    }

    /// The next SIGHUP.
    pub(crate) async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.0.as_mut() {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

/// Cancels `token` on SIGINT or SIGTERM (Ctrl-C only, off Unix).
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received: shutting down");
        token.cancel();
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default: `default_level`).
pub fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
