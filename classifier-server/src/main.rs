//! `classifier-server`: the model server daemon. See the library docs for the pipeline.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use classifier_server::{
    cancel_on_signals, connect_with_retry, init_tracing, load_classifier, AppConfig, ModelServer,
};
use tokio_util::sync::CancellationToken;

/// Classifies images arriving on a broker topic and publishes the predictions.
///
/// Start more replicas with the same group to share the load. SIGINT/SIGTERM stop
/// intake, finish the requests in flight and exit 0.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Config file (TOML with [broker], [server], [client] tables).
    #[arg(long, env = "CLASSIFIER_CONFIG")]
    config: Option<PathBuf>,
    /// Broker backend: embedded, kafka, pubsub or redis (overrides the file).
    #[arg(long)]
    broker: Option<String>,
    /// Model directory (model.safetensors + metadata.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Topic to consume requests from.
    #[arg(long)]
    request_topic: Option<String>,
    /// Consumer group shared by the replicas.
    #[arg(long)]
    group: Option<String>,
    /// Name of this replica in replies and logs.
    #[arg(long)]
    server_id: Option<String>,
    /// Largest batch run through the model at once.
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// Longest wait for a batch to fill, in milliseconds.
    #[arg(long)]
    max_batch_wait_ms: Option<u64>,
    /// Seconds to finish in-flight requests after SIGTERM.
    #[arg(long)]
    drain_timeout_secs: Option<u64>,
}

impl Args {
    fn config(&self) -> anyhow::Result<AppConfig> {
        let mut config = AppConfig::load(self.config.as_deref())?;
        if let Some(backend) = &self.broker {
            config.select_backend(backend)?;
            config.broker.apply_env(&|name| std::env::var(name).ok());
        }
        let server = &mut config.server;
        if let Some(model) = &self.model {
            server.model_dir = Some(model.clone());
        }
        if let Some(topic) = &self.request_topic {
            server.request_topic = topic.clone();
        }
        if let Some(group) = &self.group {
            server.group = group.clone();
        }
        if let Some(id) = &self.server_id {
            server.server_id = id.clone();
        }
        if let Some(size) = self.max_batch_size {
            server.max_batch_size = size;
        }
        if let Some(wait) = self.max_batch_wait_ms {
            server.max_batch_wait_ms = wait;
        }
        if let Some(secs) = self.drain_timeout_secs {
            server.drain_timeout_secs = secs;
        }
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing("info");
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config()?;
    if config.broker.in_process_only() {
        tracing::warn!(
            "the {} broker lives inside this process: only clients in this process can reach it \
             (use `client-app classify`, which starts its own server, or pick kafka/pubsub)",
            config.broker.backend()
        );
    }
    let classifier = load_classifier(&config.server)?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let broker = match connect_with_retry(&config.broker, &shutdown).await {
        Ok(broker) => broker,
        Err(_) if shutdown.is_cancelled() => {
            tracing::info!("stopped before the broker became reachable");
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    let server = ModelServer::new(broker.clone(), config.server.clone(), classifier);
    server.run(shutdown).await?;
    broker.close().await?;
    Ok(())
}
