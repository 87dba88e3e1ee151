//! The client: sends files to the classifier servers through the broker and reports.
//!
//! - [`inputs`]: which files (walks folders);
//! - [`job`]: publishing requests with a bounded window and matching replies;
//! - [`report`]: per-file lines, summary, accuracy, confusion matrix, result files;
//! - [`html_report`]: the same as one self-contained HTML page (`--report`);
//! - [`resume`]: which files an earlier results file already answered (`--resume`);
//! - [`sort`]: copying or moving answered files into class folders (`--sort-into`);
//! - [`dead_letters`]: reading back what the servers dead-lettered, re-publishing it;
//! - [`commands`]: one function per subcommand of the `client-app` binary.
//!
//! With a broker that lives inside this process (the embedded one) the servers cannot be
//! elsewhere, so [`classify`] starts one here ([`InProcessServer`]): one command then
//! does it all.

pub mod commands;
pub mod dead_letters;
pub mod downscale;
pub mod failure;
pub mod html_report;
pub mod inputs;
pub mod job;
pub mod report;
pub mod resume;
pub mod sort;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use classifier_app::{connect_with_retry, AppConfig, ServerConfig};
use classifier_server::{load_classifier, Classifier, ModelServer, ServerStats, StatsSnapshot};
use tokio_util::sync::CancellationToken;
use unified_broker::{retry_while_unavailable, Broker};

use crate::job::{JobOptions, JobReport, Progress};

/// What `classify` produced.
pub struct ClassifyOutcome {
    /// Per-file results and totals.
    pub report: JobReport,
    /// Class names of the model, when the client loaded it (embedded mode).
    pub model_classes: Vec<String>,
}

/// Classifies `paths` with the servers reachable through `config.broker`, starting an
/// in-process server first when the broker lives only in this process.
pub async fn classify(
    config: &AppConfig,
    paths: &[PathBuf],
    progress_for: impl FnOnce(usize) -> Box<dyn Progress>,
    shutdown: &CancellationToken,
) -> anyhow::Result<ClassifyOutcome> {
    let files = inputs::collect_inputs(paths)?;
    classify_files(config, files, progress_for, shutdown).await
}

/// [`classify`] for files already listed (e.g. by [`inputs::collect_inputs`], less
/// those an earlier run answered).
pub async fn classify_files(
    config: &AppConfig,
    files: Vec<inputs::InputFile>,
    progress_for: impl FnOnce(usize) -> Box<dyn Progress>,
    shutdown: &CancellationToken,
) -> anyhow::Result<ClassifyOutcome> {
    let broker = connect_with_retry(&config.broker, shutdown).await?;
    // Some backends connect lazily: wait (with backoff, logged) until the broker answers.
    let request_topic = config.server.request_topic.as_str();
    match retry_while_unavailable("the request topic", shutdown.cancelled(), || {
        broker.ensure_topic(request_topic)
    })
    .await
    {
        Some(result) => result.context("creating the request topic")?,
        None => anyhow::bail!("interrupted while waiting for the broker"),
    }
    let mut model_classes = Vec::new();
    let mut in_process = None;
    if broker.features().in_process_only {
        let server = InProcessServer::start(&broker, &config.server).await?;
        model_classes = server.classifier().metadata().class_names.clone();
        in_process = Some(server);
    }
    let options = JobOptions::from_config(config);
    let progress = progress_for(files.len());
    let report = tokio::select! {
        report = job::run_job(Arc::clone(&broker), files, &options, progress.as_ref()) => report?,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
    };
    if let Some(server) = in_process {
        server.stop().await;
    }
    if let Err(error) = broker.close().await {
        tracing::debug!(%error, "closing the broker client failed");
    }
    Ok(ClassifyOutcome {
        report,
        model_classes,
    })
}

/// A [`ModelServer`] running inside this process on the client's broker connection:
/// needed where the broker lives only in this process, and used by `bench` to measure
/// client and server together.
pub struct InProcessServer {
    classifier: Arc<Classifier>,
    stats: Arc<ServerStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<StatsSnapshot>>,
}

impl InProcessServer {
    /// Loads the model, creates the server's topics and starts serving.
    pub async fn start(broker: &Arc<dyn Broker>, config: &ServerConfig) -> anyhow::Result<Self> {
        let classifier = load_classifier(config)?;
        let mut server_config = config.clone();
        // Nobody reads dead letters inside this process, and a group nobody consumes
        // would fill up (the embedded broker bounds every group) and stall the server:
        // keep no copies here.
        server_config.dead_letter_subscription.clear();
        let server = ModelServer::new(Arc::clone(broker), server_config, Arc::clone(&classifier));
        server
            .prepare_topics()
            .await
            .context("preparing the in-process server's topics")?;
        let stats = server.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        Ok(InProcessServer {
            classifier,
            stats,
            stop,
            task,
        })
    }

    /// The model the server runs.
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Stops the server after it finished what it holds; problems are logged.
    pub async fn stop(self) {
        self.stop.cancel();
        match self.task.await {
            Ok(Ok(_stats)) => {}
            Ok(Err(error)) => tracing::warn!("in-process server: {error:#}"),
            Err(error) => tracing::warn!("in-process server task: {error}"),
        }
    }
}
