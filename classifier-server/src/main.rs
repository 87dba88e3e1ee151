//! `classifier-server`: the model server daemon. See the library docs for the pipeline.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use classifier_server::{
    cancel_on_signals, catch_hangups, connect_with_retry, init_tracing, load_models, telemetry,
    AppConfig, ModelServer, ServerStats,
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
    /// Model directory (model.safetensors + metadata.json), the default model; or
    /// NAME=DIR, a model served under NAME for requests that ask for it (repeatable).
    /// Model directories are watched: a new model in one replaces the old between
    /// batches (a model that does not load is refused and logged).
    #[arg(long)]
    model: Vec<String>,
    /// How often to check the model directories, in milliseconds (0: only on SIGHUP).
    #[arg(long)]
    model_poll_ms: Option<u64>,
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
    /// Requests taken from the broker and not yet acked, at most.
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Serve Prometheus metrics (/metrics) and health probes (/healthz, /readyz) over
    /// HTTP on this address, e.g. 127.0.0.1:9464 (default: not served).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

impl Args {
    fn config(&self) -> anyhow::Result<AppConfig> {
        let mut config = AppConfig::load(self.config.as_deref())?;
        if let Some(backend) = &self.broker {
            config.select_backend(backend)?;
            config.broker.apply_env(&|name| std::env::var(name).ok());
        }
        let server = &mut config.server;
        let mut unnamed = 0;
        for model in &self.model {
            match model.split_once('=') {
                Some((name, _)) if !name.contains(std::path::MAIN_SEPARATOR) => server
                    .models
                    .push(model.parse().map_err(anyhow::Error::msg)?),
                _ => {
                    unnamed += 1;
                    server.model_dir = Some(PathBuf::from(model));
                }
            }
        }
        if unnamed > 1 {
            anyhow::bail!("give at most one --model DIR without a name (others as NAME=DIR)");
        }
        if let Some(ms) = self.model_poll_ms {
            server.model_poll_ms = ms;
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
        if let Some(limit) = self.max_in_flight {
            server.max_in_flight = limit;
        }
        if let Some(addr) = self.metrics_addr {
            server.metrics_addr = Some(addr);
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
    catch_hangups();
    // The endpoint comes up first, so probes can tell "starting" from "dead".
    let stats = Arc::new(ServerStats::default());
    let stop_http = CancellationToken::new();
    let http = match config.server.metrics_addr {
        Some(addr) => Some(
            telemetry::serve(addr, Arc::clone(&stats), stop_http.clone())
                .await?
                .1,
        ),
        None => None,
    };
    let models = load_models(&config.server)?;
    stats.models_loaded(&models.served());
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
    let server =
        ModelServer::with_models(broker.clone(), config.server.clone(), models).with_stats(stats);
    server.run(shutdown).await?;
    broker.close().await?;
    stop_http.cancel();
    if let Some(http) = http {
        let _ = http.await;
    }
    Ok(())
}
