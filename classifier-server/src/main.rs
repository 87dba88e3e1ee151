//! `classifier-server`: the model server daemon. See the library docs for the pipeline.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use classifier_app::{
    cancel_on_signals, connect_with_retry, init_tracing, AppConfig, ServerConfig,
};
use classifier_server::{catch_hangups, load_models, telemetry, ModelServer, ServerStats};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: messages are allocated on one thread and freed
/// on another many thousand times a second (docs/benchmarks.md, 2026-12-07 night).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    #[command(flatten)]
    server: ServerFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

/// What else the binary does besides serving (serving is the default).
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Probe a running server's health endpoint on this host and exit 0 if it answers
    /// 200, 1 otherwise: the container image's HEALTHCHECK (the image has no curl).
    /// The port is the server's metrics address (CLASSIFIER_METRICS_ADDR or
    /// server.metrics_addr), probed on loopback.
    Healthcheck {
        /// The endpoint: /healthz (alive) or /readyz (ready for requests).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Serve only the request group's backlog gauges (classifier_backlog_messages,
    /// classifier_backlog_drain_seconds) on the metrics address, asking the broker every
    /// backlog_poll_secs, without consuming: what an autoscaler reads to start the first
    /// server when none runs. Needs a metrics address and an external broker.
    BacklogExporter,
}

/// The flags that set `[server]` settings, each serialized under its field's name in
/// the config file (see [`AppConfig::apply_server_flags`]).
#[derive(Debug, clap::Args, Serialize)]
struct ServerFlags {
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
    /// How often to ask the broker for the group's backlog, in seconds (0: never).
    #[arg(long)]
    backlog_poll_secs: Option<u64>,
}

impl Args {
    /// The config file (or defaults), the environment, then the flags.
    fn config(&self) -> anyhow::Result<AppConfig> {
        let mut config = AppConfig::load(self.config.as_deref())?;
        config.apply_broker_flag(self.broker.as_deref())?;
        config.apply_server_flags(&self.server)?;
        self.apply_models(&mut config.server)?;
        Ok(config)
    }

    /// `--model DIR` sets the default model, `--model NAME=DIR` adds a named one.
    fn apply_models(&self, server: &mut ServerConfig) -> anyhow::Result<()> {
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
        Ok(())
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _tracing = init_tracing("info");
    let args = Args::parse();
    let outcome = match &args.command {
        Some(Command::Healthcheck { path }) => healthcheck(&args, path).await,
        Some(Command::BacklogExporter) => backlog_exporter(&args).await,
        None => run(args).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `classifier-server healthcheck`: one GET of `path` at the configured metrics address.
async fn healthcheck(args: &Args, path: &str) -> anyhow::Result<()> {
    let config = args.config()?;
    let addr = config.server.metrics_addr.context(
        "no metrics address to probe: set CLASSIFIER_METRICS_ADDR or server.metrics_addr",
    )?;
    let (status, body) = telemetry::probe(addr, path).await?;
    anyhow::ensure!(status == 200, "{path} answered {status}: {}", body.trim());
    Ok(())
}

/// `classifier-server backlog-exporter`: the backlog gauges, no serving.
async fn backlog_exporter(args: &Args) -> anyhow::Result<()> {
    let config = args.config()?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    classifier_server::backlog::exporter::run(&config, shutdown).await
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
    let tokens = classifier_server::bearer::BearerTokens::from_hex_digests(
        "server.metrics_token_sha256",
        &config.server.metrics_token_sha256,
    )?;
    let http = match config.server.metrics_addr {
        Some(addr) => Some(
            telemetry::serve(addr, stats.clone(), tokens, stop_http.clone())
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
