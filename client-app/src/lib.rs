//! The client: sends files to the classifier servers through the broker and reports.
//!
//! - [`inputs`]: which files (walks folders);
//! - [`job`]: publishing requests with a bounded window and matching replies;
//! - [`report`]: per-file lines, summary, accuracy, confusion matrix, result files;
//! - [`dead_letters`]: reading back what the servers dead-lettered, re-publishing it.
//!
//! With the embedded broker the servers cannot be elsewhere, so [`classify`] starts one
//! inside this process: one command then does it all.

pub mod dead_letters;
pub mod inputs;
pub mod job;
pub mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use classifier_server::server::retry_while_unavailable;
use classifier_server::{connect_with_retry, load_classifier, AppConfig, ModelServer};
use tokio_util::sync::CancellationToken;

use crate::job::{JobOptions, JobReport, Progress};

/// What `classify` produced.
pub struct ClassifyOutcome {
    /// Per-file results and totals.
    pub report: JobReport,
    /// Class names of the model, when the client loaded it (embedded mode).
    pub model_classes: Vec<String>,
}

/// Classifies `paths` with the servers reachable through `config.broker`, starting an
/// in-process server first when the broker is the embedded one.
pub async fn classify(
    config: &AppConfig,
    paths: &[PathBuf],
    progress_for: impl FnOnce(usize) -> Box<dyn Progress>,
    shutdown: &CancellationToken,
) -> anyhow::Result<ClassifyOutcome> {
    let files = inputs::collect_inputs(paths)?;
    let broker = connect_with_retry(&config.broker, shutdown).await?;
    // Some backends connect lazily: wait (with backoff, logged) until the broker answers.
    let request_topic = config.server.request_topic.as_str();
    match retry_while_unavailable("the request topic", shutdown, || {
        broker.ensure_topic(request_topic)
    })
    .await
    {
        Some(result) => result.context("creating the request topic")?,
        None => anyhow::bail!("interrupted while waiting for the broker"),
    }
    let mut model_classes = Vec::new();
    let mut in_process = None;
    if config.broker.backend() == "embedded" {
        let classifier = load_classifier(&config.server)?;
        model_classes = classifier.metadata().class_names.clone();
        let mut server_config = config.server.clone();
        // Nobody reads dead letters inside this process, and an embedded group nobody
        // consumes would fill up and stall the server: keep no copies here.
        server_config.dead_letter_subscription.clear();
        let server = ModelServer::new(Arc::clone(&broker), server_config, classifier);
        server
            .prepare_topics()
            .await
            .context("preparing the in-process server's topics")?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        in_process = Some((stop, task));
    }
    let options = JobOptions {
        request_topic: config.server.request_topic.clone(),
        server_group: config.server.group.clone(),
        window: config.client.window,
        reply_timeout: Duration::from_secs(config.client.reply_timeout_secs),
        max_file_bytes: config.client.max_file_bytes,
        top_k: config.client.top_k as u32,
    };
    let progress = progress_for(files.len());
    let report = tokio::select! {
        report = job::run_job(Arc::clone(&broker), files, &options, progress.as_ref()) => report?,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
    };
    if let Some((stop, task)) = in_process {
        stop.cancel();
        match task.await {
            Ok(Ok(_stats)) => {}
            Ok(Err(error)) => tracing::warn!("in-process server: {error:#}"),
            Err(error) => tracing::warn!("in-process server task: {error}"),
        }
    }
    if let Err(error) = broker.close().await {
        tracing::debug!(%error, "closing the broker client failed");
    }
    Ok(ClassifyOutcome {
        report,
        model_classes,
    })
}
