//! `classifier-gateway`: the Open Inference Protocol over HTTP in front of the
//! classifier servers. This file only parses the command line; the gateway is
//! [`classifier_gateway::start`].

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use classifier_app::{cancel_on_signals, init_tracing, AppConfig};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc's malloc: messages are allocated on one thread and freed
/// on another many thousand times a second (docs/benchmarks.md, 2026-12-07 night).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serves the Open Inference Protocol (v2) over HTTP and hands the work to the
/// classifier servers through the configured broker.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Config file (TOML with [broker], [server], [gateway] tables).
    #[arg(long, global = true, env = "CLASSIFIER_CONFIG")]
    config: Option<PathBuf>,
    /// Broker backend: embedded (default; a server then runs in this process), kafka,
    /// pubsub or redis.
    #[arg(long, global = true)]
    broker: Option<String>,
    #[command(flatten)]
    gateway: GatewayFlags,
    /// Model directory of the in-process server (embedded broker only).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Flags that set `[gateway]` settings, under their names in the file.
#[derive(Debug, clap::Args, Serialize)]
struct GatewayFlags {
    /// Address to serve HTTP on (default 127.0.0.1:8000).
    #[arg(long, env = "CLASSIFIER_GATEWAY_LISTEN")]
    listen: Option<SocketAddr>,
    /// SHA-256 digests (hex, comma-separated) of the accepted API keys; replaces the
    /// config's list (a container or Kubernetes secret passes them this way).
    #[arg(long, env = "CLASSIFIER_GATEWAY_API_KEY_SHA256", value_delimiter = ',')]
    api_key_sha256: Option<Vec<String>>,
    /// Where jobs keep their files and (without a database URL) their SQLite database.
    #[arg(long, env = "CLASSIFIER_GATEWAY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The jobs database: sqlite://PATH or postgres://USER@HOST/DB.
    #[arg(long, env = "CLASSIFIER_GATEWAY_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reads an API key on standard input and prints its SHA-256 digest, the form
    /// `gateway.api_key_sha256` takes.
    HashKey,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _tracing = init_tracing("info");
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::HashKey) => hash_key(),
        None => serve(&cli).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// `hash-key`: one key from stdin (a trailing newline is not part of it).
fn hash_key() -> anyhow::Result<()> {
    let mut key = String::new();
    std::io::stdin().read_to_string(&mut key)?;
    let key = key.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        anyhow::bail!("no key on standard input");
    }
    println!("{}", classifier_gateway::auth::hex_digest(key));
    Ok(())
}

/// Serves until SIGINT or SIGTERM.
async fn serve(cli: &Cli) -> anyhow::Result<()> {
    let mut config = AppConfig::load(cli.config.as_deref())?;
    config.apply_broker_flag(cli.broker.as_deref())?;
    config.apply_gateway_flags(&cli.gateway)?;
    if let Some(model) = &cli.model {
        config.server.model_dir = Some(model.clone());
    }
    let stop = CancellationToken::new();
    cancel_on_signals(stop.clone());
    let gateway = classifier_gateway::start(&config, stop).await?;
    println!("classifier-gateway listening on http://{}", gateway.addr);
    gateway.wait().await;
    Ok(())
}
