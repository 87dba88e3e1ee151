//! What the binaries (`classifier-server`, `client-app`, `classifier-gateway`, `trainer`)
//! share, so each `main.rs` only parses its flags and dispatches:
//!
//! - [`config`]: the config file (`[broker]`, `[server]`, `[client]`, `[gateway]`), with the
//!   environment and flags laid over it through one [`overlay`];
//! - [`init_tracing`]: log output on stderr, filtered by `RUST_LOG`;
//! - [`cancel_on_signals`]: SIGINT/SIGTERM as a cancellation token;
//! - [`connect_with_retry`]: a broker connection that waits out a broker still starting;
//! - [`lock`]: a mutex lock that survives a panicked holder (defined in
//!   `unified_broker::sync`, whose queues needed it first).

#[cfg(feature = "broker")]
pub mod config;
pub mod overlay;

use tokio_util::sync::CancellationToken;

#[cfg(feature = "broker")]
pub use config::{AppConfig, ClientConfig, DecodeLimits, GatewayConfig, NamedModel, ServerConfig};
/// The poison-tolerant lock, defined once for the workspace beside the broker code that
/// needed it first.
#[cfg(feature = "broker")]
pub use unified_broker::sync::lock;

/// Sets up `tracing` output on stderr, filtered by `RUST_LOG` (default: `default_level`).
/// Logs go to stderr so a command's results on stdout stay clean for pipes.
pub fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Cancels `token` on SIGINT or SIGTERM (Ctrl-C only, off Unix): every long-running
/// mode stops the same way, finishing what is in flight.
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

/// Connects to the broker, retrying with backoff while it is unreachable, until it
/// answers or `shutdown` is cancelled (a server started beside its broker must not die
/// because it won the race). Logs what it waits for.
#[cfg(feature = "broker")]
pub async fn connect_with_retry(
    config: &unified_broker::BrokerConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<std::sync::Arc<dyn unified_broker::Broker>> {
    use anyhow::Context;
    match unified_broker::retry_while_unavailable("a connection", shutdown.cancelled(), || {
        unified_broker::connect(config)
    })
    .await
    {
        Some(result) => result.context("connecting to the broker"),
        None => anyhow::bail!("stopped while waiting for the broker"),
    }
}
