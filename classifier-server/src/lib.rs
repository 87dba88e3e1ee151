//! The model server: a long-running daemon that takes classify requests from a broker
//! topic, runs the CNN on batches of them and publishes the predictions to each
//! request's reply topic.
//!
//! The binary (`src/main.rs`) is a thin shell over this library so that `client-app`
//! can run the very same server inside its own process on the embedded broker.
//!
//! - [`decode`]: untrusted bytes → image, with limits against decompression bombs;
//! - [`model_source`]: which model to load (named, per-user or built in);
//! - [`models`]: the models served, by name, reloaded when their directory changes;
//! - [`request`]: broker message → model input, predictions → reply message;
//! - [`pipeline`]: the server itself, one module per stage (intake, decode pool,
//!   batcher, model thread, reply, dead letters), and the stats they count into;
//! - [`log_safe`]: peers' strings escaped and cut before they are logged;
//! - [`telemetry`]: those stats as Prometheus metrics, and health probes, over HTTP;
//! - [`backlog`]: the request group's backlog as the broker counts it, polled into
//!   gauges for autoscalers, and the exporter that serves them with no server running;
//! - [`bearer`]: bearer tokens known by their SHA-256 digests (the metrics token, the
//!   gateway's API keys).

pub mod backlog;
pub mod bearer;
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

/// The server's settings (the config file's `[server]` table), which [`ModelServer`] takes.
pub use classifier_app::ServerConfig;
pub use classifier_inference::Classifier;
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
